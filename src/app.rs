//! The library API: what a Rust app hands drover, and what each worker's
//! service factory receives. The built-in app is written on exactly this API
//! (`builtin`).
//!
//! A service factory is called once per worker process (once in total when
//! the app runs in-process) with a typed [`Worker`]; the service it returns
//! serves every connection of that worker. drover erases the service's types
//! here, once, so the rest of the crate is not generic.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};
use hyper::body::Incoming;
use hyper::{Request, Response};

/// Errors a service may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type drover serves (any body, boxed).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// What a worker's service factory receives.
#[derive(Debug, Clone)]
pub struct Worker<C> {
    /// This worker's index, `0..workers`.
    pub id: usize,
    /// How many workers the pod runs.
    pub workers: usize,
    /// This worker's context, deserialized from its YAML.
    pub context: C,
    /// The context as JSON, exactly as configured.
    pub raw_context: serde_json::Value,
}

type DynFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// A type-erased service, shared by every connection of one process.
#[derive(Clone)]
pub(crate) struct DynService(Arc<dyn Fn(Request<Incoming>) -> DynFuture + Send + Sync>);

impl DynService {
    pub(crate) fn new<S, B>(svc: S) -> DynService
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = Arc::new(svc);
        DynService(Arc::new(move |req| {
            let fut = svc.call(req);
            Box::pin(async move {
                match fut.await {
                    Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync())),
                    Err(e) => Err(e.into()),
                }
            })
        }))
    }
}

impl hyper::service::Service<Request<Incoming>> for DynService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = DynFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        (self.0)(req)
    }
}

/// Checks that worker `id`'s context fits the app's context type.
pub(crate) type Validate = dyn Fn(usize, &serde_json::Value) -> Result<(), String> + Send + Sync;

/// A factory that builds one process's service from its [`Worker`].
pub(crate) type Factory<'a> =
    dyn Fn(usize, usize, serde_json::Value) -> Result<DynService, String> + 'a;

/// Erases a typed factory: deserializes the context into `C` and boxes the
/// service. A context that does not fit `C` is an error naming the worker.
pub(crate) fn erase<'a, C, F, S, B>(
    factory: &'a F,
) -> impl Fn(usize, usize, serde_json::Value) -> Result<DynService, String> + 'a
where
    C: serde::de::DeserializeOwned,
    F: Fn(Worker<C>) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    move |id, workers, raw: serde_json::Value| {
        let context: C = typed_context(id, &raw)?;
        Ok(DynService::new(factory(Worker {
            id,
            workers,
            context,
            raw_context: raw,
        })))
    }
}

/// Deserializes worker `id`'s context into the app's type.
pub(crate) fn typed_context<C: serde::de::DeserializeOwned>(
    id: usize,
    raw: &serde_json::Value,
) -> Result<C, String> {
    C::deserialize(raw)
        .map_err(|e| format!("worker {id}'s context does not fit the app's context type: {e}"))
}

/// A full response body from bytes; handy for handlers.
pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// How this process reaches the stop flag, set once when drover starts
/// serving.
#[derive(Debug)]
pub(crate) enum Stopper {
    /// The app runs inside the supervisor: set the flag directly.
    InProcess(crate::stop::StopFlag),
    /// The app runs in a worker process: tell the supervisor over the
    /// worker's control socket (`DROVER_STOP_FD`).
    Worker(crate::control::WorkerSender),
}

static STOPPER: std::sync::OnceLock<Stopper> = std::sync::OnceLock::new();
static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn install_stopper(stopper: Stopper) {
    let _ = STOPPER.set(stopper);
}

/// A worker process was told that the service is draining.
pub(crate) fn mark_draining() {
    DRAINING.store(true, std::sync::atomic::Ordering::Release);
}

/// Stops the whole service, like mpservice's `stop_server`: callable from any
/// handler of a library app, in-process or in a worker process. Every worker
/// and the supervisor then drain as after `POST /admin/stop`. Returns false
/// when the calling process is not serving under drover (nothing to stop).
pub fn stop() -> bool {
    match STOPPER.get() {
        Some(Stopper::InProcess(flag)) => {
            flag.request(crate::stop::StopSource::Worker);
            true
        }
        Some(Stopper::Worker(sender)) => sender.send(crate::control::ToSupervisor::Stop),
        None => false,
    }
}

/// Whether the service is draining (the flag is set), as far as this process
/// has been told. Lets a handler refuse new long jobs during a drain.
pub fn is_draining() -> bool {
    match STOPPER.get() {
        Some(Stopper::InProcess(flag)) => flag.is_set(),
        _ => DRAINING.load(std::sync::atomic::Ordering::Acquire),
    }
}
