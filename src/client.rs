//! `drover stop`: posts to `/admin/stop` so preStop hooks work in images
//! with no shell and no curl. Exit 0 on 202, 77 on 401/403, 69 otherwise.

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::config::StopArgs;
use crate::error::{Error, Result};

/// Sends the stop request; Ok when the admin server answered 202.
pub fn stop(args: StopArgs) -> Result<()> {
    let url = args.admin_url.clone().unwrap_or_else(|| {
        let port = std::env::var("DROVER_ADMIN_PORT").unwrap_or_else(|_| "8001".into());
        format!("http://127.0.0.1:{port}")
    });
    let token_file = args
        .token_file
        .clone()
        .or_else(|| std::env::var_os("DROVER_ADMIN_TOKEN_FILE").map(Into::into));
    let token = match &token_file {
        None => None,
        Some(p) => Some(
            String::from_utf8(std::fs::read(p).map_err(|source| Error::ReadFile {
                what: "token file",
                path: p.clone(),
                source,
            })?)
            .map_err(|_| Error::Config(format!("token file {} is not UTF-8", p.display())))?
            .trim()
            .to_string(),
        ),
    };
    let base: Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("--admin-url {url}: {e}")))?;
    if base.scheme_str() != Some("http") {
        return Err(Error::Config(format!(
            "--admin-url {url}: only http:// URLs are supported"
        )));
    }
    let authority = base
        .authority()
        .ok_or_else(|| Error::Config(format!("--admin-url {url}: no host")))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(80);
    let prefix = base.path().trim_end_matches('/');
    let path = format!("{prefix}/admin/stop");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the runtime", e))?;
    let status = rt
        .block_on(async {
            tokio::time::timeout(args.timeout, async {
                let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
                tokio::spawn(conn);
                let mut req = Request::builder()
                    .method(Method::POST)
                    .uri(path.as_str())
                    .header(HOST, authority.as_str());
                if let Some(t) = &token {
                    req = req.header(AUTHORIZATION, format!("Bearer {t}"));
                }
                let req = req
                    .body(Empty::<Bytes>::new())
                    .map_err(std::io::Error::other)?;
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(resp.status())
            })
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            })
        })
        .map_err(|e| {
            Error::StopUnavailable(format!("cannot reach the admin server at {url}: {e}"))
        })?;
    match status {
        StatusCode::ACCEPTED => Ok(()),
        StatusCode::UNAUTHORIZED => Err(Error::StopRefused(format!(
            "{url} answered 401: give the admin token with --token-file"
        ))),
        StatusCode::FORBIDDEN => Err(Error::StopRefused(format!(
            "{url} answered 403: without a token only loopback callers may stop"
        ))),
        other => Err(Error::StopUnavailable(format!(
            "{url} answered {other}, not 202"
        ))),
    }
}
