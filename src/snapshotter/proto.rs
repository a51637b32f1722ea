//! containerd's gRPC API, generated at build time from `proto/` (see its README). The module tree
//! mirrors the protobuf packages, as the generated code refers to its siblings by relative paths.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `containerd.*`.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services`.
    pub mod services {
        /// Snapshots (served by lazyblk, used by `lazyblk pull`).
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// Content store.
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        /// Image records.
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        /// Leases.
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        /// Diff (apply a layer to mounts).
        pub mod diff {
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
    }
}

pub use containerd::services::{content::v1 as content, diff::v1 as diff, images::v1 as images};
pub use containerd::services::{leases::v1 as leases, snapshots::v1 as snapshots};
pub use containerd::types;
