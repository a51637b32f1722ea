//! Whole-image conversion: read an image (registry or OCI layout), convert every layer, and write the
//! result next to the original — as a new tag, or as an OCI referrer artifact.

pub mod convert;
pub mod oci;
pub mod store;

use std::path::PathBuf;

use crate::fetch::registry::RegistryOptions;
use crate::fetch::FetchError;
use store::{ImageStore, LayoutStore, RegistryStore};

/// An image-level failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

impl From<FetchError> for ImageError {
    fn from(e: FetchError) -> Self {
        ImageError(e.message)
    }
}

impl From<std::io::Error> for ImageError {
    fn from(e: std::io::Error) -> Self {
        ImageError(e.to_string())
    }
}

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `host[:port]/repo[:tag][@digest]`.
    Registry {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// Tag or digest (`latest` when neither is given).
        reference: String,
    },
    /// `oci:PATH[:TAG]` (skopeo's convention).
    Layout {
        /// Layout directory.
        path: PathBuf,
        /// Tag (empty: the only image in the layout).
        reference: String,
    },
}

impl ImageRef {
    /// Parses a reference.
    pub fn parse(s: &str) -> Result<ImageRef, ImageError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') => (p, t),
                _ => (rest, ""),
            };
            return Ok(ImageRef::Layout {
                path: PathBuf::from(path),
                reference: tag.to_string(),
            });
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (name, None),
        };
        let (registry, repository) = crate::fetch::registry::split_name(name);
        if repository.is_empty() {
            return Err(ImageError(format!("{s:?}: no repository")));
        }
        let reference = match (digest, tag) {
            (Some(d), _) => {
                lazyblk_image_format::parse_digest(d)
                    .map_err(|e| ImageError(format!("{s:?}: {e}")))?;
                d.to_string()
            }
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        };
        Ok(ImageRef::Registry {
            registry,
            repository,
            reference,
        })
    }

    /// The tag or digest.
    pub fn reference(&self) -> &str {
        match self {
            ImageRef::Registry { reference, .. } | ImageRef::Layout { reference, .. } => reference,
        }
    }

    /// Opens the store holding this image.
    pub fn store(
        &self,
        opts: &RegistryOptions,
        write: bool,
    ) -> Result<Box<dyn ImageStore>, ImageError> {
        Ok(match self {
            ImageRef::Registry {
                registry,
                repository,
                ..
            } => Box::new(RegistryStore::new(registry, repository, opts, write)?),
            ImageRef::Layout { path, .. } => Box::new(LayoutStore::open(path, write)?),
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry {
                registry,
                repository,
                reference,
            } if reference.starts_with("sha256:") => {
                write!(f, "{registry}/{repository}@{reference}")
            }
            ImageRef::Registry {
                registry,
                repository,
                reference,
            } => write!(f, "{registry}/{repository}:{reference}"),
            ImageRef::Layout { path, reference } => write!(f, "oci:{}:{reference}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            r,
            ImageRef::Registry {
                registry: "127.0.0.1:5000".into(),
                repository: "team/app".into(),
                reference: "v1".into()
            }
        );
        let r = ImageRef::parse("127.0.0.1:5000/app").unwrap();
        assert_eq!(r.reference(), "latest");
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            ImageRef::parse(&format!("reg.io/app:v1@{d}"))
                .unwrap()
                .reference(),
            d
        );
        assert!(
            matches!(ImageRef::parse("debian").unwrap(), ImageRef::Registry { repository, .. } if repository == "library/debian")
        );
        // Docker Hub as CRI names it: fully qualified, with and without `library/`.
        for name in [
            "docker.io/library/nginx:latest",
            "docker.io/nginx:latest",
            "index.docker.io/library/nginx",
            "nginx",
            "library/nginx",
        ] {
            assert_eq!(
                ImageRef::parse(name).unwrap(),
                ImageRef::Registry {
                    registry: "registry-1.docker.io".into(),
                    repository: "library/nginx".into(),
                    reference: "latest".into()
                },
                "{name}"
            );
        }
        assert!(
            matches!(ImageRef::parse("docker.io/bitnami/redis").unwrap(), ImageRef::Registry { registry, repository, .. } if registry == "registry-1.docker.io" && repository == "bitnami/redis")
        );
        // Other registries keep single-name repositories as they are.
        assert!(
            matches!(ImageRef::parse("reg.io/app").unwrap(), ImageRef::Registry { repository, .. } if repository == "app")
        );
        assert_eq!(
            ImageRef::parse("oci:/tmp/x:v2").unwrap(),
            ImageRef::Layout {
                path: "/tmp/x".into(),
                reference: "v2".into()
            }
        );
        assert_eq!(ImageRef::parse("oci:/tmp/x").unwrap().reference(), "");
        assert!(ImageRef::parse("reg.io/app@sha256:nothex").is_err());
    }
}
