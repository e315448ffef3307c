//! Worker contexts from a Kubernetes ConfigMap, through the API: read once
//! at start (with specific, actionable errors), then watched.
//!
//! Client configuration is what Kubernetes users expect: `KUBECONFIG` or
//! `~/.kube/config` when present, else the pod's service account (token, CA,
//! `KUBERNETES_SERVICE_HOST/PORT`). The namespace is the one given as `NS/`,
//! else the pod's (`POD_NAMESPACE`, then the service-account namespace file),
//! else the kubeconfig context's.
//!
//! The watch needs only the `get` and `watch` verbs on that one ConfigMap
//! (what the chart's Role grants by `resourceNames`): it GETs the object for
//! its `resourceVersion`, then WATCHes with a `metadata.name` field selector
//! from that version. A watch that times out is resumed from the last version
//! seen; on `410 Gone`, a dropped connection or any error it GETs again and
//! starts over, with backoff. This module never starts or stops a worker: it
//! reports what it read.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::WatchParams;
use kube::core::WatchEvent;
use kube::{Api, Client, Config};
use tokio::sync::mpsc;

use crate::contexts::Update;
use crate::error::{Error, Result};

const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Server-side timeout of one watch request (the API server's default is
/// 30–60 minutes; a shorter one makes dead connections visible sooner).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// `--worker-contexts-configmap [NS/]NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapRef {
    /// The namespace, if given.
    pub namespace: Option<String>,
    /// The ConfigMap's name.
    pub name: String,
}

/// Parses `[NS/]NAME`, checking both are DNS-1123 names.
pub fn parse_ref(s: &str) -> Result<ConfigMapRef> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, s),
    };
    let valid = |n: &str, max: usize| {
        !n.is_empty()
            && n.len() <= max
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && n.as_bytes()[0].is_ascii_alphanumeric()
            && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
    };
    if let Some(ns) = ns {
        if !valid(ns, 63) || ns.contains('.') {
            return Err(Error::Config(format!(
                "--worker-contexts-configmap {s}: `{ns}` is not a valid namespace name"
            )));
        }
    }
    if !valid(name, 253) {
        return Err(Error::Config(format!(
            "--worker-contexts-configmap {s}: `{name}` is not a valid ConfigMap name (lowercase letters, digits, '-', '.')"
        )));
    }
    Ok(ConfigMapRef {
        namespace: ns.map(str::to_string),
        name: name.to_string(),
    })
}

/// A connected ConfigMap source.
#[derive(Clone)]
pub struct Source {
    api: Api<ConfigMap>,
    /// The namespace in use.
    pub namespace: String,
    /// The ConfigMap's name.
    pub name: String,
    /// The key holding the YAML.
    pub key: String,
}

impl Source {
    /// `namespace/name key K`, for messages.
    pub fn origin(&self) -> String {
        format!(
            "ConfigMap {}/{} key {:?}",
            self.namespace, self.name, self.key
        )
    }
}

/// What one read found.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The YAML text under the key.
    pub text: String,
    /// The object's `resourceVersion`.
    pub resource_version: String,
}

/// Builds the client (kubeconfig, else in-cluster) and decides the namespace.
pub async fn connect(r: &ConfigMapRef, key: &str) -> Result<Source> {
    let config = Config::infer().await.map_err(|e| {
        Error::Config(format!(
            "no Kubernetes client configuration for --worker-contexts-configmap: {e} (set KUBECONFIG, or run in a pod with a service account)"
        ))
    })?;
    let namespace = r
        .namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or_else(|| {
            std::fs::read_to_string(SA_NAMESPACE_FILE)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)
        .map_err(|e| Error::Config(format!("cannot build a Kubernetes client: {e}")))?;
    Ok(Source {
        api: Api::namespaced(client, &namespace),
        namespace,
        name: r.name.clone(),
        key: key.to_string(),
    })
}

/// Why one GET failed.
enum GetError {
    /// Worth retrying: unreachable, timed out, 5xx, 429.
    Transient(String),
    /// Final: the configuration is wrong.
    Fatal(Error),
}

async fn get_once(src: &Source) -> std::result::Result<Fetched, GetError> {
    match src.api.get(&src.name).await {
        Ok(cm) => extract(src, &cm).map_err(GetError::Fatal),
        Err(kube::Error::Api(status)) => {
            let (ns, name) = (&src.namespace, &src.name);
            let msg = &status.message;
            Err(match status.code {
                404 => GetError::Fatal(Error::Contexts(format!(
                    "ConfigMap {ns}/{name} not found: create it or fix --worker-contexts-configmap ({msg})"
                ))),
                401 => GetError::Fatal(Error::Contexts(format!(
                    "the Kubernetes API rejected drover's credentials (401 Unauthorized) reading ConfigMap {ns}/{name}: check the service account token or kubeconfig user ({msg})"
                ))),
                403 => GetError::Fatal(Error::Contexts(format!(
                    "forbidden (403): the service account needs `get` and `watch` on configmaps named \"{name}\" in namespace \"{ns}\" (the chart's Role grants exactly that): {msg}"
                ))),
                429 | 500..=599 => GetError::Transient(format!("the API server answered {}: {msg}", status.code)),
                code => GetError::Fatal(Error::Contexts(format!(
                    "reading ConfigMap {ns}/{name}: the API server answered {code}: {msg}"
                ))),
            })
        }
        Err(e) => Err(GetError::Transient(e.to_string())),
    }
}

fn extract(src: &Source, cm: &ConfigMap) -> Result<Fetched> {
    let data = cm.data.clone().unwrap_or_default();
    let Some(text) = data.get(&src.key) else {
        let mut keys: Vec<&String> = data.keys().collect();
        keys.extend(cm.binary_data.iter().flat_map(|b| b.keys()));
        let keys = if keys.is_empty() {
            "it has no keys".to_string()
        } else {
            format!(
                "its keys are: {}",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(Error::Contexts(format!(
            "ConfigMap {}/{} has no key {:?} ({keys}); set --worker-contexts-key",
            src.namespace, src.name, src.key
        )));
    };
    Ok(Fetched {
        text: text.clone(),
        resource_version: cm.metadata.resource_version.clone().unwrap_or_default(),
    })
}

/// Reads the ConfigMap at start. An unreachable API server or a 5xx is
/// retried with backoff, a log line per attempt, for at most `retry_for`.
pub async fn fetch_at_start(src: &Source, retry_for: Duration) -> Result<Fetched> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match get_once(src).await {
            Ok(f) => return Ok(f),
            Err(GetError::Fatal(e)) => return Err(e),
            Err(GetError::Transient(why)) => {
                let spent = started.elapsed();
                if spent + delay > retry_for {
                    return Err(Error::Contexts(format!(
                        "cannot read {} after {attempt} attempts in {:.1}s: {why}",
                        src.origin(),
                        spent.as_secs_f64()
                    )));
                }
                tracing::warn!(attempt, retry_in = ?delay, "cannot read {} yet: {why}", src.origin());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(4));
                attempt += 1;
            }
        }
    }
}

/// Watches the ConfigMap from `resource_version` and sends every value seen
/// (the receiver ignores values it already has). Runs until `tx` closes.
pub async fn watch(src: Source, mut resource_version: String, tx: mpsc::UnboundedSender<Update>) {
    let mut delay = Duration::from_millis(250);
    let send = |text: std::result::Result<String, String>, version: String| {
        tx.send(Update {
            text,
            origin: src.origin(),
            version,
        })
        .is_ok()
    };
    loop {
        if tx.is_closed() {
            return;
        }
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={}", src.name))
            .timeout(WATCH_TIMEOUT_SECS);
        let restart = match src.api.watch(&wp, &resource_version).await {
            Err(e) => Some(format!("cannot start the watch: {e}")),
            Ok(stream) => {
                futures::pin_mut!(stream);
                let mut why = None;
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(WatchEvent::Added(cm)) | Ok(WatchEvent::Modified(cm)) => {
                            delay = Duration::from_millis(250);
                            match extract(&src, &cm) {
                                Ok(f) => {
                                    resource_version = f.resource_version.clone();
                                    if !send(Ok(f.text), f.resource_version) {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    resource_version =
                                        cm.metadata.resource_version.clone().unwrap_or_default();
                                    if !send(Err(e.to_string()), resource_version.clone()) {
                                        return;
                                    }
                                }
                            }
                        }
                        Ok(WatchEvent::Deleted(cm)) => {
                            resource_version =
                                cm.metadata.resource_version.clone().unwrap_or_default();
                            tracing::warn!(
                                "{} was deleted; the workers keep their last contexts",
                                src.origin()
                            );
                        }
                        Ok(WatchEvent::Bookmark(b)) => {
                            resource_version = b.metadata.resource_version
                        }
                        Ok(WatchEvent::Error(status)) if status.code == 410 => {
                            // The version is older than the server keeps
                            // (an unchanged ConfigMap's own version expires
                            // too): watch from "now"; the server first sends
                            // the current object, which dedupes if unchanged.
                            tracing::info!(
                                "{}: the watch expired (410 Gone: {}); watching from the current state",
                                src.origin(),
                                status.message
                            );
                            resource_version.clear();
                            break;
                        }
                        Ok(WatchEvent::Error(status)) => {
                            why = Some(format!(
                                "the watch failed ({} {}): {}",
                                status.code, status.reason, status.message
                            ));
                            break;
                        }
                        Err(e) => {
                            why = Some(format!("the watch connection failed: {e}"));
                            break;
                        }
                    }
                }
                why
            }
        };
        match restart {
            // A server-side timeout: resume from the last version seen.
            None => continue,
            Some(why) => {
                tracing::warn!("{}: {why}", src.origin());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                match get_once(&src).await {
                    Ok(f) => {
                        resource_version = f.resource_version.clone();
                        if !send(Ok(f.text), f.resource_version) {
                            return;
                        }
                    }
                    Err(GetError::Transient(e)) => tracing::warn!("{}: {e}", src.origin()),
                    Err(GetError::Fatal(e)) => {
                        if !send(Err(e.to_string()), resource_version.clone()) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_parse_with_and_without_namespace() {
        assert_eq!(
            parse_ref("prod/ctx").unwrap(),
            ConfigMapRef {
                namespace: Some("prod".into()),
                name: "ctx".into()
            }
        );
        assert_eq!(parse_ref("ctx.v1").unwrap().namespace, None);
        assert!(parse_ref("Prod/ctx").is_err());
        assert!(parse_ref("a/b/c").is_err());
        assert!(parse_ref("").is_err());
        assert!(parse_ref("ns/").is_err());
    }
}
