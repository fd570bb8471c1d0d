//! One keep-alive HTTP/1.1 connection and one timed chat-completion call over it.
//!
//! hyper's connection-level client is used rather than a pooled client so that the
//! number of connections is exactly what the run asks for, and nothing (pool look-ups,
//! DNS, redirects) sits between the clock and the socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Stands for the request number in a `--unique-prompt` body; replaced before sending.
pub const NUMBER_MARK: &str = "@@LOADGEN_N@@";

/// The request body: the same bytes every time, or numbered so that no two are equal.
pub enum Body {
    Fixed(Bytes),
    /// The serialized body split around [`NUMBER_MARK`]; each request puts the next
    /// number there (a copy of under 200 bytes, the same cost on every target).
    Numbered {
        head: Bytes,
        tail: Bytes,
        next: AtomicU64,
    },
}

impl Body {
    /// Split a serialized body that contains [`NUMBER_MARK`] once.
    pub fn numbered(serialized: &Bytes) -> anyhow::Result<Self> {
        let mark = NUMBER_MARK.as_bytes();
        let at = serialized
            .windows(mark.len())
            .position(|w| w == mark)
            .context("the body has no number mark")?;
        Ok(Self::Numbered {
            head: serialized.slice(..at),
            tail: serialized.slice(at + mark.len()..),
            next: AtomicU64::new(0),
        })
    }

    fn next(&self) -> Bytes {
        match self {
            Self::Fixed(bytes) => bytes.clone(),
            Self::Numbered { head, tail, next } => {
                let n = next.fetch_add(1, Ordering::Relaxed).to_string();
                let mut out = Vec::with_capacity(head.len() + n.len() + tail.len());
                out.extend_from_slice(head);
                out.extend_from_slice(n.as_bytes());
                out.extend_from_slice(tail);
                Bytes::from(out)
            }
        }
    }
}

/// What every request carries: where to send it and the (shared) body.
pub struct Target {
    /// `host:port`, connected to and sent as the Host header.
    pub authority: String,
    pub path: String,
    pub body: Body,
    pub authorization: Option<HeaderValue>,
    pub timeout: Duration,
}

impl Target {
    pub fn new(
        url: &str,
        body: Body,
        api_key: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only plain http:// URLs are supported (got `{url}`)");
        }
        let authority = match uri.authority() {
            Some(a) if a.port().is_some() => a.to_string(),
            Some(a) => format!("{}:80", a.host()),
            None => bail!("`{url}` has no host"),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let authorization = api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .context("the API key is not a valid header value")?;
        Ok(Self {
            authority,
            path,
            body,
            authorization,
            timeout,
        })
    }

    fn request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::post(self.path.as_str())
            .header(HOST, self.authority.as_str())
            .header(CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        Ok(builder.body(Full::new(self.body.next()))?)
    }
}

/// An open HTTP/1.1 connection; its driver runs on a spawned task.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(target: &Target) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(&target.authority)
            .await
            .with_context(|| format!("cannot connect to {}", target.authority))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the server closes it;
            // a failure shows up on the request that was in flight.
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    /// Send the target's next request; the response body is left to the caller.
    pub async fn send(&mut self, target: &Target) -> anyhow::Result<Response<Incoming>> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(target.request()?).await?)
    }

    /// False once the server closed the connection or a request on it failed.
    pub fn is_usable(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// How one call ended. Times are measured from `origin` (the scheduled send time in
/// open-loop runs, the actual send time in closed-loop runs).
pub enum Outcome {
    /// A 2xx response, read to the end.
    Ok {
        first_byte: Duration,
        full: Duration,
    },
    /// A complete response with a non-2xx status.
    Status(u16),
    /// Connect, send, read or timeout failure; the connection must not be reused.
    Failed(String),
}

/// Send one request on `conn` and read the whole response.
pub async fn call(conn: &mut Conn, target: &Target, origin: Instant) -> Outcome {
    match tokio::time::timeout(target.timeout, exchange(conn, target, origin)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
        Err(_) => Outcome::Failed(format!("timed out after {:?}", target.timeout)),
    }
}

async fn exchange(conn: &mut Conn, target: &Target, origin: Instant) -> anyhow::Result<Outcome> {
    let response = conn.send(target).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first_byte = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if first_byte.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
            first_byte = Some(origin.elapsed());
        }
    }
    let full = origin.elapsed();
    if !status.is_success() {
        return Ok(Outcome::Status(status.as_u16()));
    }
    Ok(Outcome::Ok {
        first_byte: first_byte.unwrap_or(full),
        full,
    })
}
