//! HTTP plumbing shared by the providers that talk to a real upstream: the client, the
//! first-byte timeout, failure classification, and SSE decoding.
//!
//! The client is hyper-util's pooled client with rustls, not reqwest: reqwest's own
//! layers (its redirect policy parses the URL again on every request even with
//! redirects off, the response parses it once more, its proxy matcher runs per request)
//! cost about 25k instructions a call, an eighth of the gateway's work per request. A
//! provider talks to one base URL, so the proxy decision (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, as reqwest read them) is made once, when it is built.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::header::{CONTENT_TYPE, HeaderValue, PROXY_AUTHORIZATION};
use ::http::{HeaderMap, Request, Response, Uri};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use secrecy::ExposeSecret;
use sse_stream::{Sse, SseStream};
use tokio::net::TcpStream;
use tower::Service;

use super::{ErrorClass, UpstreamError, report, retry_after_from_headers};
use crate::config::ProviderConfig;
use crate::limits::capacity::Capacity;

type BoxError = Box<dyn StdError + Send + Sync>;

/// A provider's HTTP client: its own pool and connect timeout, its default headers
/// (the API key among them), and its route to the upstream, direct or through a proxy.
pub(crate) struct Upstream {
    client: Client<HttpsConnector<Route>, Full<Bytes>>,
    headers: HeaderMap,
}

impl Upstream {
    /// A client for `base`, the provider's base URL (every URL it is later asked to
    /// post to has the same scheme and host), with the proxies the environment names.
    pub(crate) fn new(
        config: &ProviderConfig,
        default_headers: HeaderMap,
        base: &Uri,
    ) -> anyhow::Result<Upstream> {
        Upstream::with_proxies(config, default_headers, base, &Matcher::from_env())
    }

    pub(crate) fn with_proxies(
        config: &ProviderConfig,
        default_headers: HeaderMap,
        base: &Uri,
        proxies: &Matcher,
    ) -> anyhow::Result<Upstream> {
        let tls = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()?;
        let tls =
            hyper_rustls::ConfigBuilderExt::try_with_platform_verifier(tls)?.with_no_client_auth();
        Upstream::with_tls(config, default_headers, base, proxies, tls)
    }

    /// The client, trusting what `tls` trusts (the platform's roots outside tests).
    fn with_tls(
        config: &ProviderConfig,
        default_headers: HeaderMap,
        base: &Uri,
        proxies: &Matcher,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Upstream> {
        let mut headers = default_headers;
        for (name, value) in &config.headers {
            headers.insert(
                ::http::HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // Pooled connections sit idle between bursts; probes find one a NAT or load
        // balancer dropped silently, and an unacknowledged write gives up after 30 s
        // (reqwest's defaults, kept).
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        #[cfg(target_os = "linux")]
        http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        // https URLs pass through this connector on their way to TLS.
        http.enforce_http(false);
        let route = match proxies.intercept(base) {
            None => Route::Direct(http),
            Some(proxy) => {
                let uri = proxy.uri().clone();
                if uri.scheme_str() != Some("http") {
                    anyhow::bail!(
                        "provider `{}`: the proxy for {base} must be an http:// URL \
                         (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY); {} proxies are not supported",
                        config.name,
                        uri.scheme_str().unwrap_or("scheme-less")
                    );
                }
                let auth = proxy.basic_auth().cloned();
                if base.scheme_str() == Some("https") {
                    let mut tunnel = Tunnel::new(uri, http);
                    if let Some(auth) = auth {
                        tunnel = tunnel.with_auth(auth);
                    }
                    Route::Tunnel(tunnel)
                } else {
                    if let Some(mut auth) = auth {
                        auth.set_sensitive(true);
                        headers.insert(PROXY_AUTHORIZATION, auth);
                    }
                    Route::Forward { http, proxy: uri }
                }
            }
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(route);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Upstream { client, headers })
    }

    /// A JSON `POST` of `body` to `uri`, with the default headers.
    fn post(&self, uri: &Uri, body: Vec<u8>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = ::http::Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.reserve(self.headers.len() + 1);
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }
}

/// A provider's URL (`base` + `path`), checked and normalized by the `url` crate (IDNA
/// host, percent-encoding) before it becomes the `Uri` requests are sent to.
pub(crate) fn upstream_uri(base: &str, path: &str) -> anyhow::Result<Uri> {
    let url = url::Url::parse(&format!("{base}{path}"))?;
    Ok(url.as_str().parse()?)
}

/// How a provider's connections reach it.
#[derive(Clone)]
enum Route {
    Direct(HttpConnector),
    /// An https upstream through an HTTP proxy: `CONNECT`, then TLS inside the tunnel.
    Tunnel(Tunnel<HttpConnector>),
    /// A plain-http upstream through an HTTP proxy: requests go to the proxy, in
    /// absolute form.
    Forward {
        http: HttpConnector,
        proxy: Uri,
    },
}

impl Service<Uri> for Route {
    type Response = RouteIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<RouteIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Every connector here is always ready (HttpConnector's poll_ready is).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Route::Direct(http) => {
                let connecting = http.call(dst);
                Box::pin(async move {
                    let io = connecting.await?;
                    Ok(RouteIo { io, forward: false })
                })
            }
            Route::Tunnel(tunnel) => {
                let connecting = tunnel.call(dst);
                Box::pin(async move {
                    let io = connecting.await?;
                    Ok(RouteIo { io, forward: false })
                })
            }
            Route::Forward { http, proxy } => {
                let connecting = http.call(proxy.clone());
                Box::pin(async move {
                    let io = connecting.await?;
                    Ok(RouteIo { io, forward: true })
                })
            }
        }
    }
}

/// A connection made by a [`Route`]: the socket, and whether requests on it go to a
/// forwarding proxy (which makes hyper write them in absolute form).
struct RouteIo {
    io: TokioIo<TcpStream>,
    forward: bool,
}

impl Connection for RouteIo {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forward)
    }
}

impl hyper::rt::Read for RouteIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for RouteIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// An upstream's answer: status, headers, and the body still to be read.
pub(crate) type UpstreamResponse = Response<Incoming>;

/// The API key as a header value, marked sensitive so it never shows in debug output.
pub(crate) fn secret_header(
    config: &ProviderConfig,
    prefix: &str,
) -> anyhow::Result<Option<::http::HeaderValue>> {
    match &config.api_key {
        None => Ok(None),
        Some(key) => {
            let mut v = ::http::HeaderValue::from_str(&format!("{prefix}{}", key.expose_secret()))?;
            v.set_sensitive(true);
            Ok(Some(v))
        }
    }
}

/// POST the JSON `body` to `uri` and wait for the response headers within
/// `first_byte`; a non-2xx answer becomes a classified error, its body read by
/// `parse_error`. Every answer's rate-limit headers and status go to `capacity`.
pub(crate) async fn send(
    provider: &'static str,
    upstream: &Upstream,
    (uri, body): (&Uri, Vec<u8>),
    first_byte: Duration,
    parse_error: fn(&serde_json::Value) -> ErrorBody,
    capacity: Option<&Capacity>,
) -> Result<UpstreamResponse, UpstreamError> {
    let request = upstream.post(uri, body);
    let response = match tokio::time::timeout(first_byte, upstream.client.request(request)).await {
        Err(_) => {
            return Err(UpstreamError::timeout(
                provider,
                "response headers",
                first_byte,
            ));
        }
        Ok(Err(e)) => return Err(transport_error(provider, &e)),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    report(capacity, status.as_u16(), response.headers());
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after_from_headers(response.headers());
    let text = match tokio::time::timeout(first_byte, response.into_body().collect()).await {
        Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Ok(Err(_)) | Err(_) => String::new(),
    };
    let body = serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| parse_error(&v))
        .unwrap_or_else(|_| ErrorBody {
            message: if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.chars().take(500).collect()
            },
            ..ErrorBody::default()
        });
    let mut error = UpstreamError::from_status(
        provider,
        status.as_u16(),
        body.message,
        body.code,
        body.kind.as_deref(),
        retry_after,
    );
    error.param = body.param;
    Err(error)
}

/// What a provider's error body says.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    pub message: String,
    pub code: Option<String>,
    pub kind: Option<String>,
    pub param: Option<String>,
}

/// A failed exchange (connect, TLS, proxy, a dropped connection, a broken body): a
/// timeout when the cause is one, else a connection error; the message names every
/// cause in the chain, as the top-level error alone rarely says why.
pub(crate) fn transport_error(
    provider: &'static str,
    e: &(dyn StdError + 'static),
) -> UpstreamError {
    let mut class = ErrorClass::Connection;
    let mut message = String::new();
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            class = ErrorClass::Timeout;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&c.to_string());
        cause = c.source();
    }
    UpstreamError::new(class, provider, message)
}

/// Read the whole body within `total`.
pub(crate) async fn body_bytes(
    provider: &'static str,
    response: UpstreamResponse,
    total: Duration,
) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout(total, response.into_body().collect()).await {
        Err(_) => Err(UpstreamError::timeout(provider, "complete response", total)),
        Ok(Err(e)) => Err(transport_error(provider, &e)),
        Ok(Ok(body)) => Ok(body.to_bytes()),
    }
}

/// The SSE events of a response body; a broken body ends with a `Connection` error.
pub(crate) fn sse_events(
    provider: &'static str,
    response: UpstreamResponse,
) -> impl Stream<Item = Result<Sse, UpstreamError>> + Send {
    SseStream::new(response.into_body()).map(move |item| {
        item.map_err(|e| {
            UpstreamError::new(
                ErrorClass::Connection,
                provider,
                format!("stream broken: {e}"),
            )
        })
    })
}

pub(crate) fn invalid_response(
    provider: &'static str,
    what: &str,
    e: impl std::fmt::Display,
) -> UpstreamError {
    UpstreamError::new(
        ErrorClass::InvalidResponse,
        provider,
        format!("unreadable {what}: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn config() -> ProviderConfig {
        ProviderConfig {
            name: "up".into(),
            kind: ProviderKind::Openai,
            base_url: "unused".into(),
            api_key: None,
            connect_timeout: Duration::from_secs(2),
            headers: [("x-extra".to_string(), "1".to_string())].into(),
            chaos: Default::default(),
        }
    }

    /// Accepts one connection, reads a request head, writes `reply`, and returns the
    /// head and the first bytes the client sent after it (for a tunnel: TLS).
    async fn one_exchange(listener: TcpListener, reply: &'static [u8]) -> (String, Vec<u8>) {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before a whole request head");
            seen.extend_from_slice(&buf[..n]);
            if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&seen[..head_end]).into_owned();
        socket.write_all(reply).await.unwrap();
        let mut after = seen[head_end..].to_vec();
        if after.is_empty() {
            let n = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf))
                .await
                .map_or(0, |r| r.unwrap_or(0));
            after.extend_from_slice(&buf[..n]);
        }
        (head, after)
    }

    async fn post(upstream: &Upstream, uri: &Uri) -> Result<(u16, Bytes), UpstreamError> {
        let first_byte = Duration::from_secs(5);
        let response = send(
            "up",
            upstream,
            (uri, b"{}".to_vec()),
            first_byte,
            |_| ErrorBody::default(),
            None,
        )
        .await?;
        let status = response.status().as_u16();
        Ok((status, body_bytes("up", response, first_byte).await?))
    }

    /// `head` (case aside) starts with the request line `first` and holds every line of
    /// `lines`, each whole.
    fn assert_head(head: &str, first: &str, lines: &[&str]) {
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with(&format!("{first}\r\n")), "{head}");
        for line in lines {
            assert!(
                head.contains(&format!("\r\n{line}\r\n")),
                "{line} in {head}"
            );
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"ok\":1}\n";

    #[tokio::test]
    async fn plain_http_goes_to_the_proxy_in_absolute_form_with_its_credentials() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxies = Matcher::builder()
            .http(format!("http://user:pw@{}", proxy.local_addr().unwrap()))
            .build();
        let uri: Uri = "http://upstream.invalid:8080/v1/chat/completions"
            .parse()
            .unwrap();
        let upstream = Upstream::with_proxies(&config(), HeaderMap::new(), &uri, &proxies).unwrap();
        let exchange = tokio::spawn(one_exchange(proxy, OK));
        let (status, body) = post(&upstream, &uri).await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"{\"ok\":1}\n"[..]));
        let (head, _) = exchange.await.unwrap();
        assert_head(
            &head,
            "post http://upstream.invalid:8080/v1/chat/completions http/1.1",
            &[
                "proxy-authorization: basic dxnlcjpwdw==",
                "content-type: application/json",
                "x-extra: 1",
            ],
        );
    }

    #[tokio::test]
    async fn https_is_tunnelled_with_connect_and_tls_starts_inside_the_tunnel() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxies = Matcher::builder()
            .https(format!("http://user:pw@{}", proxy.local_addr().unwrap()))
            .build();
        let uri: Uri = "https://api.example.invalid/v1/messages".parse().unwrap();
        let upstream = Upstream::with_proxies(&config(), HeaderMap::new(), &uri, &proxies).unwrap();
        let exchange = tokio::spawn(one_exchange(proxy, b"HTTP/1.1 200 OK\r\n\r\n"));
        // The fake proxy speaks no TLS: the exchange fails after the ClientHello.
        let error = post(&upstream, &uri).await.unwrap_err();
        assert_eq!(error.class, ErrorClass::Connection, "{error:?}");
        let (head, after) = exchange.await.unwrap();
        assert_head(
            &head,
            "connect api.example.invalid:443 http/1.1",
            &["proxy-authorization: basic dxnlcjpwdw=="],
        );
        // A TLS handshake record (0x16), not the request, follows the CONNECT.
        assert_eq!(after.first(), Some(&0x16), "{after:?}");
    }

    #[tokio::test]
    async fn no_proxy_hosts_are_reached_directly() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        // A proxy nobody listens on: using it would fail the request.
        let proxies = Matcher::builder()
            .all("http://127.0.0.1:9")
            .no("127.0.0.1")
            .build();
        let uri: Uri = format!("http://{addr}/v1/embeddings").parse().unwrap();
        let upstream = Upstream::with_proxies(&config(), HeaderMap::new(), &uri, &proxies).unwrap();
        let exchange = tokio::spawn(one_exchange(origin, OK));
        let (status, _) = post(&upstream, &uri).await.unwrap();
        assert_eq!(status, 200);
        let (head, _) = exchange.await.unwrap();
        assert!(
            head.starts_with("POST /v1/embeddings HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("proxy-authorization"),
            "{head}"
        );
    }

    /// A TLS server for `localhost` with a fresh self-signed certificate, offering
    /// `alpn`; it answers every request with the HTTP version it arrived in. Returns its
    /// port and the certificate to trust.
    async fn tls_server(alpn: &[&[u8]]) -> (u16, rustls::pki_types::CertificateDer<'static>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let version = format!("{:?}", request.version());
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(version),
                            )))
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, der)
    }

    fn trusting(cert: rustls::pki_types::CertificateDer<'static>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// A client for `https://localhost:{port}` that trusts only `cert`.
    fn tls_upstream(
        port: u16,
        cert: rustls::pki_types::CertificateDer<'static>,
    ) -> (Upstream, Uri) {
        let uri: Uri = format!("https://localhost:{port}/v1/chat/completions")
            .parse()
            .unwrap();
        let no_proxy = Matcher::builder().build();
        let upstream =
            Upstream::with_tls(&config(), HeaderMap::new(), &uri, &no_proxy, trusting(cert))
                .unwrap();
        (upstream, uri)
    }

    #[tokio::test]
    async fn https_upstreams_speak_http2_when_the_server_offers_it_and_http1_otherwise() {
        for (alpn, expected) in [
            (&[&b"h2"[..], b"http/1.1"][..], "HTTP/2.0"),
            (&[&b"http/1.1"[..]][..], "HTTP/1.1"),
        ] {
            let (port, cert) = tls_server(alpn).await;
            let (upstream, uri) = tls_upstream(port, cert);
            // Twice: the second request reuses the pooled connection.
            for _ in 0..2 {
                let (status, body) = post(&upstream, &uri).await.unwrap();
                assert_eq!((status, &body[..]), (200, expected.as_bytes()));
            }
        }
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_connection_error() {
        let (port, _) = tls_server(&[b"http/1.1"]).await;
        let (_, other) = tls_server(&[b"http/1.1"]).await;
        let (upstream, uri) = tls_upstream(port, other);
        let error = post(&upstream, &uri).await.unwrap_err();
        assert_eq!(error.class, ErrorClass::Connection, "{error:?}");
        assert!(error.message.contains("certificate"), "{}", error.message);
    }

    #[test]
    fn a_proxy_that_is_not_plain_http_is_refused_when_the_provider_is_built() {
        let uri: Uri = "https://api.example.invalid/v1".parse().unwrap();
        for proxy in [
            "socks5://127.0.0.1:1080",
            "https://proxy.example.invalid:3128",
        ] {
            let proxies = Matcher::builder().all(proxy).build();
            let error = Upstream::with_proxies(&config(), HeaderMap::new(), &uri, &proxies)
                .err()
                .expect("refused");
            let message = error.to_string();
            assert!(message.contains("must be an http:// URL"), "{message}");
            assert!(message.contains("provider `up`"), "{message}");
        }
    }

    #[tokio::test]
    async fn a_connect_that_outlasts_the_connect_timeout_is_a_timeout() {
        // A listener that never accepts, its backlog full: further SYNs go unanswered.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await
            {
                held.push(s);
            }
        }
        let config = ProviderConfig {
            connect_timeout: Duration::from_millis(300),
            ..config()
        };
        let uri: Uri = format!("http://{addr}/v1/chat/completions")
            .parse()
            .unwrap();
        let upstream =
            Upstream::with_proxies(&config, HeaderMap::new(), &uri, &Matcher::builder().build())
                .unwrap();
        let started = std::time::Instant::now();
        let error = post(&upstream, &uri).await.unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout, "{error:?}");
        // The connect timeout, not the 5 s first-byte one.
        assert!(started.elapsed() < Duration::from_secs(3), "{error:?}");
        assert!(error.message.contains("connect"), "{}", error.message);
        drop(listener);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connection_error_naming_its_cause() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let uri: Uri = format!("http://{addr}/v1/chat/completions")
            .parse()
            .unwrap();
        let upstream = Upstream::with_proxies(
            &config(),
            HeaderMap::new(),
            &uri,
            &Matcher::builder().build(),
        )
        .unwrap();
        let error = post(&upstream, &uri).await.unwrap_err();
        assert_eq!(error.class, ErrorClass::Connection, "{error:?}");
        assert!(
            error.message.to_lowercase().contains("refused"),
            "{}",
            error.message
        );
    }
}
