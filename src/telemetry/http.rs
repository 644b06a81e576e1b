//! The local status endpoint: a small HTTP/1.1 server (hyper) answering GET requests
//! from a [`Routes`] table, and the client `citygate status` uses to query it.
//!
//! It is meant for localhost (the config refuses other addresses unless they are opted
//! into with `danger_…`): requests are bounded (16 connections, 5 s to send the headers,
//! GET and HEAD only), answers are rendered from the counters at request time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub(crate) fn ok(content_type: &'static str, body: String) -> Reply {
        Reply {
            status: 200,
            content_type,
            body,
        }
    }

    pub(crate) fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        Reply {
            status,
            content_type: "application/json",
            body: body + "\n",
        }
    }
}

/// What the endpoint serves: `None` is a 404.
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Option<Reply>;
}

/// Serves `routes` on `listener` until `token` is cancelled.
pub async fn serve(listener: TcpListener, routes: Arc<dyn Routes>, token: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = token.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "status endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let reply = answer(routes.as_ref(), &req);
                async move { Ok::<_, Infallible>(reply) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "status endpoint: connection ended with an error");
                },
                _ = token.cancelled() => {}
            }
        });
    }
}

/// Binds `listen` and serves `routes` on it in a task until `token` is cancelled; must
/// run inside a tokio runtime. A bind failure (port taken) costs observability, not the
/// process: it is logged and `None` returned. Returns the bound address.
pub(crate) fn spawn_endpoint(
    listen: SocketAddr,
    routes: Arc<dyn Routes>,
    token: CancellationToken,
) -> Option<SocketAddr> {
    let bound = std::net::TcpListener::bind(listen).and_then(|l| {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            warn!(%listen, error = %e, "status endpoint disabled: cannot listen");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    tokio::spawn(serve(listener, routes, token));
    tracing::info!(%addr, "status endpoint: /status /metrics /health");
    Some(addr)
}

fn answer(routes: &dyn Routes, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match routes.get(req.uri().path()) {
        Some(reply) => {
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
            let body = if head { String::new() } else { reply.body };
            Response::builder()
                .status(status)
                .header("content-type", reply.content_type)
                .header("cache-control", "no-store")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "bad reply\n"))
        }
        None => plain(
            StatusCode::NOT_FOUND,
            "not found; try /status, /metrics or /health\n",
        ),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Why a GET against a status endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source} (is `citygate run` running with this config?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {limit:?}")]
    Timeout { addr: SocketAddr, limit: Duration },
    #[error("HTTP error talking to {addr}: {message}")]
    Http { addr: SocketAddr, message: String },
}

/// GETs `path` from `addr`: the status code and the body as text.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> Result<(u16, String), ClientError> {
    tokio::time::timeout(limit, get_inner(addr, path))
        .await
        .unwrap_or(Err(ClientError::Timeout { addr, limit }))
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    let http = |e: &dyn std::fmt::Display| ClientError::Http {
        addr,
        message: e.to_string(),
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Routes for Fixed {
        fn get(&self, path: &str) -> Option<Reply> {
            (path == "/hello").then(|| Reply::ok("text/plain", "hi\n".into()))
        }
    }

    #[tokio::test]
    async fn serves_routes_404s_the_rest_and_stops_on_cancel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), token.clone()));
        let limit = Duration::from_secs(5);
        assert_eq!(
            get(addr, "/hello", limit).await.unwrap(),
            (200, "hi\n".into())
        );
        assert_eq!(get(addr, "/nope", limit).await.unwrap().0, 404);
        token.cancel();
        tokio::time::timeout(limit, server).await.unwrap().unwrap();
        assert!(matches!(
            get(addr, "/hello", limit).await,
            Err(ClientError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_requests_do_not_stop_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Fixed), token.clone()));
        for junk in [
            &b"\x00\xff\r\n\r\n"[..],
            b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(junk).await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            let text = String::from_utf8_lossy(&buf);
            assert!(text.starts_with("HTTP/1.1 4"), "{text}");
        }
        assert_eq!(
            get(addr, "/hello", Duration::from_secs(5)).await.unwrap().0,
            200
        );
        token.cancel();
    }
}
