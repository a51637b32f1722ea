//! The control API: a tonic gRPC service on `RUN_DIR/daemon.sock` (mode 0600), and its client.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use tonic::{Request, Response, Status};

use super::daemon::{Node, NodeError};
use super::proto::daemon_client::DaemonClient;
use super::proto::daemon_server::{Daemon, DaemonServer};
use super::proto::{
    AttachRequest, DetachReply, DetachRequest, Event, EventsRequest, LayerStatus, ListReply,
    ListRequest, PutCredentialsReply, PutCredentialsRequest, RecoverRequest,
};
use super::spec::LayerSpec;
use crate::fetch::credentials::Credentials;

/// The control socket of a run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon.sock")
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match e {
            NodeError::Invalid(m) => Status::invalid_argument(m),
            NodeError::NotFound(m) => Status::not_found(m),
            NodeError::Busy(m) => Status::failed_precondition(m),
            NodeError::Failed(m) => Status::unavailable(m),
        }
    }
}

/// The gRPC service over a [`Node`].
pub struct Api(pub Node);

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl Daemon for Api {
    async fn attach(&self, r: Request<AttachRequest>) -> Result<Response<LayerStatus>, Status> {
        let spec = LayerSpec::from_json(r.into_inner().spec_json.as_bytes())
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(self.0.attach(spec).await?))
    }

    async fn detach(&self, r: Request<DetachRequest>) -> Result<Response<DetachReply>, Status> {
        self.0.detach(&r.into_inner().device).await?;
        Ok(Response::new(DetachReply {}))
    }

    async fn list(&self, _r: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        Ok(Response::new(ListReply {
            layers: self.0.list(),
        }))
    }

    async fn recover(&self, _r: Request<RecoverRequest>) -> Result<Response<ListReply>, Status> {
        self.0.recover().await;
        Ok(Response::new(ListReply {
            layers: self.0.list(),
        }))
    }

    async fn put_credentials(
        &self,
        r: Request<PutCredentialsRequest>,
    ) -> Result<Response<PutCredentialsReply>, Status> {
        let r = r.into_inner();
        if r.registry.is_empty() || r.repository.is_empty() {
            return Err(Status::invalid_argument(
                "registry and repository are required",
            ));
        }
        let c = credentials_of(&r);
        crate::fetch::keychain::global().put(
            &r.registry,
            &r.repository,
            c,
            std::time::Duration::from_secs(r.ttl_secs),
        );
        tracing::info!(registry = %r.registry, repository = %r.repository, ttl_secs = r.ttl_secs, "run-time registry credentials received");
        Ok(Response::new(PutCredentialsReply {}))
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        r: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        use futures::StreamExt;
        let follow = r.into_inner().follow;
        let (history, rx) = self.0.events().subscribe();
        let past = futures::stream::iter(history.into_iter().map(Ok));
        if !follow {
            return Ok(Response::new(Box::pin(past)));
        }
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|e| async move {
            match e {
                Ok(e) => Some(Ok(e)),
                // A slow follower missed some: say so instead of silently skipping.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Ok(Event {
                        kind: "lagged".into(),
                        message: format!("{n} events dropped for this slow follower"),
                        ..Event::default()
                    }))
                }
            }
        });
        Ok(Response::new(Box::pin(past.chain(live))))
    }
}

/// Serves the API on `RUN_DIR/daemon.sock` until `shutdown` resolves. A stale socket (crash) is
/// replaced; the socket is 0600.
pub async fn serve(
    node: Node,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let path = socket_path(&node.config().run_dir);
    let listener = crate::process::bind_private_unix(&path)?;
    tonic::transport::Server::builder()
        .add_service(DaemonServer::new(Api(node)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(std::io::Error::other)?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A client of the daemon serving a run directory.
pub type Client = DaemonClient<tonic::transport::Channel>;

/// Connects to the daemon of `run_dir`; `None` when none is listening there.
pub async fn connect(run_dir: &Path) -> Option<Client> {
    let path = socket_path(run_dir);
    if !path.exists() {
        return None;
    }
    let channel = tonic::transport::Endpoint::try_from("http://lazyblk.daemon")
        .ok()?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .ok()?;
    Some(DaemonClient::new(channel))
}

/// Asks the daemon to attach `spec`.
pub async fn attach(client: &mut Client, spec: &LayerSpec) -> Result<LayerStatus, Status> {
    let spec_json = serde_json::to_string(spec).expect("spec serialises");
    Ok(client
        .attach(AttachRequest { spec_json })
        .await?
        .into_inner())
}

fn credentials_of(r: &PutCredentialsRequest) -> Credentials {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Credentials {
        username: r.username.clone(),
        password: r.password.clone(),
        identity_token: opt(&r.identity_token),
        registry_token: opt(&r.registry_token),
    }
}

/// Hands `creds` for `registry/repository` to the daemon for `ttl`.
pub async fn put_credentials(
    client: &mut Client,
    registry: &str,
    repository: &str,
    creds: &Credentials,
    ttl: std::time::Duration,
) -> Result<(), Status> {
    client
        .put_credentials(PutCredentialsRequest {
            registry: registry.to_string(),
            repository: repository.to_string(),
            username: creds.username.clone(),
            password: creds.password.clone(),
            identity_token: creds.identity_token.clone().unwrap_or_default(),
            registry_token: creds.registry_token.clone().unwrap_or_default(),
            ttl_secs: ttl.as_secs(),
        })
        .await?;
    Ok(())
}
