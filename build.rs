//! Compiles containerd's API protos and the node daemon's control API (src/snapshotter/proto, see its README) with tonic-prost-build.
//! Needs `protoc` (Debian: protobuf-compiler); the well-known types are vendored next to the protos.

fn main() {
    let root = "src/snapshotter/proto";
    let api = "github.com/containerd/containerd/api";
    let protos: Vec<String> = [
        "services/snapshots/v1/snapshots.proto",
        "services/content/v1/content.proto",
        "services/images/v1/images.proto",
        "services/leases/v1/leases.proto",
        "services/diff/v1/diff.proto",
    ]
    .iter()
    .map(|p| format!("{root}/{api}/{p}"))
    .collect();
    println!("cargo:rerun-if-changed={root}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &[root.to_string()])
        .expect("compiling containerd's protos (is protoc installed? apt-get install protobuf-compiler)");
    // The node daemon's own control API.
    println!("cargo:rerun-if-changed=src/node/proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["src/node/proto/daemon.proto"], &["src/node/proto"])
        .expect("compiling src/node/proto/daemon.proto");
}
