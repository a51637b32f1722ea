//! The CRI image-service proxy (the "CRI keychain" stargz and SOCI offer): kubelet talks to it with
//! `--image-service-endpoint=unix:///run/lazyblk/cri.sock` and it forwards every image call to
//! containerd's CRI socket unchanged. From each `PullImage` that carries credentials (the pod's
//! `imagePullSecrets`, resolved by kubelet) it keeps those credentials in the process keychain, scoped
//! to the pulled image's registry and repository and for a bounded time, so the snapshotter (index
//! fetch at Prepare) and the node daemon (the layer reads, handed over with each attach) can read that
//! image's layers lazily. Nothing is written to disk or logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::fetch::credentials::Credentials;
use crate::image::ImageRef;

/// The proxy: containerd's CRI image service behind it.
pub struct CriProxy {
    backend: ImageServiceClient<Channel>,
    ttl: Duration,
}

/// A channel to a unix socket, connected on first use (containerd may start after the snapshotter).
fn lazy_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Ok(
        tonic::transport::Endpoint::try_from("http://[::]:0")?.connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }),
        ),
    )
}

/// What the pull secret of `auth` says, as credentials (`auth` is base64 `user:password`).
pub fn credentials_of(auth: &AuthConfig) -> Option<Credentials> {
    let mut c = Credentials {
        username: auth.username.clone(),
        password: auth.password.clone(),
        identity_token: (!auth.identity_token.is_empty()).then(|| auth.identity_token.clone()),
        registry_token: (!auth.registry_token.is_empty()).then(|| auth.registry_token.clone()),
    };
    if c.username.is_empty() && c.password.is_empty() && !auth.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        c.username = u.to_string();
        c.password = p.to_string();
    }
    (c.has_password() || c.identity_token.is_some() || c.registry_token.is_some()).then_some(c)
}

impl CriProxy {
    /// A proxy to containerd's CRI socket `backend`, keeping credentials for `ttl`.
    pub fn new(backend: &Path, ttl: Duration) -> Result<CriProxy, tonic::transport::Error> {
        Ok(CriProxy {
            backend: ImageServiceClient::new(lazy_channel(backend)?),
            ttl,
        })
    }

    /// Keeps the credentials of a `PullImage` for its image's repository.
    fn keep(&self, r: &PullImageRequest) {
        let (Some(image), Some(auth)) = (&r.image, &r.auth) else {
            return;
        };
        let Some(creds) = credentials_of(auth) else {
            return;
        };
        match ImageRef::parse(&image.image) {
            Ok(ImageRef::Registry {
                registry,
                repository,
                ..
            }) => {
                crate::fetch::keychain::global().put(&registry, &repository, creds, self.ttl);
                tracing::info!(%registry, %repository, ttl_secs = self.ttl.as_secs(), "pull secret kept for lazy reads of this repository");
            }
            _ => {
                tracing::warn!(image = %image.image, "PullImage with credentials for an image name lazyblk cannot parse; not kept")
            }
        }
    }
}

#[tonic::async_trait]
impl ImageService for CriProxy {
    async fn list_images(
        &self,
        r: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.backend.clone().list_images(r.into_inner()).await
    }

    async fn image_status(
        &self,
        r: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.backend.clone().image_status(r.into_inner()).await
    }

    async fn pull_image(
        &self,
        r: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let r = r.into_inner();
        // Before containerd pulls: its unpack prepares the layers, and the snapshotter needs them.
        self.keep(&r);
        self.backend.clone().pull_image(r).await
    }

    async fn remove_image(
        &self,
        r: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.backend.clone().remove_image(r.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        r: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.backend.clone().image_fs_info(r.into_inner()).await
    }
}

/// Listens on `listen` (0600, a stale socket replaced) and serves the proxy until `shutdown`.
pub async fn serve(
    listen: PathBuf,
    backend: PathBuf,
    ttl: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    if let Some(dir) = listen.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = crate::process::bind_private_unix(&listen)?;
    let proxy = CriProxy::new(&backend, ttl).map_err(std::io::Error::other)?;
    tracing::info!(listen = %listen.display(), backend = %backend.display(), "CRI image-service proxy ready");
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(proxy))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(std::io::Error::other)?;
    let _ = std::fs::remove_file(&listen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_secret_forms() {
        let a = |u: &str, p: &str, auth: &str, idt: &str| AuthConfig {
            username: u.into(),
            password: p.into(),
            auth: auth.into(),
            identity_token: idt.into(),
            ..Default::default()
        };
        assert_eq!(
            credentials_of(&a("alice", "pw", "", "")),
            Some(Credentials::basic("alice", "pw"))
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        assert_eq!(
            credentials_of(&a("", "", &b64, "")),
            Some(Credentials::basic("bob", "s3cret"))
        );
        let t = credentials_of(&a("", "", "", "refresh")).unwrap();
        assert_eq!(t.identity_token.as_deref(), Some("refresh"));
        assert_eq!(credentials_of(&a("", "", "", "")), None);
        assert_eq!(credentials_of(&a("", "", "not base64!", "")), None);
    }
}
