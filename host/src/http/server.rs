//! Serving connections: the accept loop, and what keeps slow, idle or numerous clients from
//! holding the server. `axum::serve` has none of it (no header timeout, no idle timeout, no
//! connection cap), so Kiln drives hyper itself:
//!
//! - **Connection caps**: at most `max_connections` open at once; past it a new connection gets
//!   a `503` with `Connection: close` and is closed, without reading from it. Optionally at most
//!   `max_connections_per_client` from one address (off by default: behind a proxy or an
//!   ingress every connection comes from one address). A client behind a proxy listed in
//!   `trusted_proxies` is known by its `X-Forwarded-For` address instead, and held to the same
//!   number of requests in flight (the proxy's own connections are not counted per client).
//! - **Header read timeout**: from the first byte of a request to the end of its headers
//!   (`header_read_timeout_ms`); past it the connection is closed (a half-sent header holds
//!   nothing longer).
//! - **Idle timeout**: a connection on which nothing moves for `idle_timeout_ms` is closed,
//!   both between requests (keep-alive) and while a client does not read its response.
//! - **Minimum body rate**: a request body must arrive at `min_body_rate` bytes per second on
//!   average after a grace period (`body_grace_ms`); a slower one fails with `408` and the
//!   connection closes. Bodies declared larger than the route allows get their `413` from the
//!   `Content-Length` header before a byte of them is read (see `ApiJson`).
//! - **Lingering close**: an answer given before the request body was read (`401`, `413`,
//!   `429`, `408`) closes the connection; closing a socket with unread bytes makes the kernel
//!   send a reset, which can reach the client before it has read its answer (it sees "connection
//!   reset", not the `401`). So the server first closes its sending side, then reads and drops
//!   what still arrives until the client closes, for at most [`LINGER`] and [`LINGER_BYTES`].
//!
//! Each has a test that crosses it (`tests/tests/all/connections.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::{ApiError, ErrorCode};
use crate::config::{Config, IpPrefix};

/// How long a closing connection keeps reading (and dropping) what its client still sends, so
/// that the client reads its answer instead of a reset: long enough for a client that is
/// mid-upload to see the answer and stop, short enough that a client that never stops holds
/// its connection only briefly (nginx's `lingering_time` is 30 s with a 5 s gap; 5 s in all is
/// plenty on the networks Kiln serves).
pub const LINGER: Duration = Duration::from_secs(5);

/// The most a closing connection reads and drops: the largest body any route takes (an admin
/// plugin upload, 64 MiB). Past it the client is not reading its answer anyway.
pub const LINGER_BYTES: u64 = 64 << 20;

/// What a refused connection (past a connection cap) reads and drops before it closes: the
/// head of one request and a little of its body. It holds a descriptor past the cap, so it
/// lingers less than a served one.
const REFUSE_LINGER_BYTES: u64 = 64 << 10;

/// What the accept loop and each connection are held to (from [`Config`]).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// 0: no cap per client address.
    pub max_connections_per_client: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes per second; 0: no minimum.
    pub min_body_rate: u64,
    pub body_grace: Duration,
    pub trusted_proxies: Vec<IpPrefix>,
}

impl ConnectionLimits {
    pub fn from_config(config: &Config) -> Self {
        ConnectionLimits {
            max_connections: config.max_connections.max(1),
            max_connections_per_client: config.max_connections_per_client,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            min_body_rate: config.min_body_rate,
            body_grace: config.body_grace,
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|p| p.contains(ip))
    }

    /// The address a request comes from: the peer's, or, when the peer is a trusted proxy, the
    /// last address in `X-Forwarded-For` that is not itself a trusted proxy (the one the
    /// nearest trusted proxy saw; what a client writes further left is not believed).
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in forwarded.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.trusts(ip) => continue,
                Ok(ip) => return ip,
                // A malformed hop: stop believing the header there.
                Err(_) => break,
            }
        }
        peer
    }
}

/// The address a request comes from (a request extension; see [`ConnectionLimits::client_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Open connections (or requests in flight, behind a proxy) per client address.
#[derive(Debug, Default)]
struct PerClient {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One place of a client in [`PerClient`], given back on drop.
struct ClientPlace {
    counts: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn enter(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientPlace> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientPlace {
            counts: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting,
/// lets every open connection finish its request in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = Arc::new(PerClient::default());
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // not the server's end. A short pause lets descriptors free up.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tokio::spawn(refuse(
                stream,
                format!(
                    "the server has its maximum of {} connections open: retry shortly",
                    limits.max_connections
                ),
            ));
            continue;
        };
        let place = if limits.max_connections_per_client > 0 && !limits.trusts(peer.ip()) {
            match per_client.enter(peer.ip(), limits.max_connections_per_client) {
                Some(place) => Some(place),
                None => {
                    tokio::spawn(refuse(
                        stream,
                        format!(
                            "your address has its maximum of {} connections open: reuse one \
                             (keep-alive) or close some",
                            limits.max_connections_per_client
                        ),
                    ));
                    continue;
                }
            }
        } else {
            None
        };
        let connection = Connection {
            app: app.clone(),
            limits: Arc::clone(&limits),
            per_client: Arc::clone(&per_client),
            peer,
            _permit: permit,
            _place: place,
        };
        tokio::spawn(connection.run(stream, closing_rx.clone()));
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a permit until it ends: all of them back means all ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
    Ok(())
}

/// Answers a connection the server will not take with a 503 and closes it, reading nothing of
/// its request but what it drops while lingering (see the module docs); a client that does not
/// read the answer within a second is just closed.
async fn refuse(mut stream: TcpStream, message: String) {
    let error = ApiError {
        retry_after: Some(1),
        ..ApiError::new(ErrorCode::Overloaded, message)
    };
    let body = error.body("-").to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        let mut drain = Drain::default();
        std::future::poll_fn(|cx| drain.poll(&mut stream, REFUSE_LINGER_BYTES, cx)).await;
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Reading and dropping what a client still sends after its connection's sending side closed,
/// until it closes too (see the module docs).
#[derive(Debug, Default)]
struct Drain {
    dropped: u64,
}

impl Drain {
    /// Ready when the client has closed, the connection failed, or `limit` bytes were dropped.
    fn poll(&mut self, io: &mut TcpStream, limit: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.dropped += buf.filled().len() as u64;
                    if self.dropped >= limit {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One accepted connection and what it holds while open.
struct Connection {
    app: Router,
    limits: Arc<ConnectionLimits>,
    per_client: Arc<PerClient>,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _place: Option<ClientPlace>,
}

impl Connection {
    async fn run(self, stream: TcpStream, mut closing: watch::Receiver<bool>) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = Watched::new(stream, Arc::clone(&activity), Arc::clone(&self.limits));
        let Connection {
            app,
            limits,
            per_client,
            peer,
            ..
        } = self;
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let request = request.map(Body::new);
            let app = app.clone();
            let limits = Arc::clone(&limits);
            let per_client = Arc::clone(&per_client);
            let activity = Arc::clone(&activity);
            async move {
                Ok::<_, std::convert::Infallible>(
                    serve_request(app, &limits, &per_client, peer.ip(), activity, request).await,
                )
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            // Kiln keeps its own header timeout (`Watched`), which also knows idle from slow.
            .header_read_timeout(None)
            .serve_connection(hyper_util::rt::TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %peer, "connection ended: {e}");
                }
            }
            () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
                // Finish the request in flight, then close (no new request on this connection).
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

/// One request of a connection: its client address, its place (behind a trusted proxy, when
/// clients are capped), the app, and a body that keeps its connection busy until sent.
async fn serve_request(
    app: Router,
    limits: &ConnectionLimits,
    per_client: &Arc<PerClient>,
    peer: IpAddr,
    activity: Arc<Activity>,
    mut request: Request,
) -> Response {
    let busy = Busy::start(activity);
    let client = limits.client_of(peer, request.headers());
    let place = if limits.max_connections_per_client > 0 && client != peer {
        match per_client.enter(client, limits.max_connections_per_client) {
            Some(place) => Some(place),
            None => {
                let error = ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        ErrorCode::Overloaded,
                        format!(
                            "your address has its maximum of {} requests in flight",
                            limits.max_connections_per_client
                        ),
                    )
                };
                return error.into_response();
            }
        }
    } else {
        None
    };
    request.extensions_mut().insert(ClientAddr(client));
    let body_read = Arc::new(AtomicBool::new(http_body::Body::is_end_stream(
        request.body(),
    )));
    let seen = Arc::clone(&body_read);
    request = request.map(|body| Body::new(ReadToEnd { body, seen }));
    if limits.min_body_rate > 0 {
        let (rate, grace) = (limits.min_body_rate, limits.body_grace);
        request = request.map(|body| Body::new(MinRateBody::new(body, rate, grace)));
    }
    let mut response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if !body_read.load(Ordering::Relaxed) {
        // Answered before the body was read (hyper then closes the connection): say so, as
        // RFC 9112 section 9.6 asks, so that the client does not try to reuse it.
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response.map(|body| {
        Body::new(Held {
            body,
            _held: (busy, place),
        })
    })
}

/// What a connection is doing, shared by its IO wrapper and its requests.
#[derive(Debug)]
struct Activity {
    /// Requests whose response is not yet fully sent.
    in_flight: AtomicUsize,
    /// Requests started, so the IO wrapper sees that the head it was timing has been read.
    started: AtomicU64,
    /// When the connection opened; `last_done_ns` counts from here.
    opened: Instant,
    /// When the last response was sent (or the connection opened), ns after `opened`.
    last_done_ns: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            opened: Instant::now(),
            last_done_ns: AtomicU64::new(0),
        }
    }

    /// Since when the connection has had no request in flight.
    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_nanos(self.last_done_ns.load(Ordering::Relaxed))
    }
}

/// A request in flight on its connection, until its response body is sent (or dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let done = self.0.opened.elapsed().as_nanos() as u64;
        self.0.last_done_ns.store(done, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds something (the request's [`Busy`] mark, its client place) until
/// the body is sent or dropped.
struct Held<T> {
    body: Body,
    _held: T,
}

impl<T: Unpin + Send + 'static> http_body::Body for Held<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, with the header and idle timeouts (see the module docs). Reads:
/// while no request is in flight, waiting for the next one may last `idle_timeout` (then the
/// connection ends as a client's close would); once a request's first byte has come, its head
/// must be complete within `header_read_timeout` (then it fails). Writes: a response the
/// client does not read for `idle_timeout` fails the connection.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
    limits: Arc<ConnectionLimits>,
    /// The first byte of a head not yet read whole, and `activity.started` then.
    head_started: Option<(Instant, u64)>,
    /// Since when writing has been blocked.
    write_blocked_since: Option<Instant>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// Once the sending side is shut: until when to linger, and what was dropped.
    closing: Option<(Instant, Drain)>,
}

impl Watched {
    fn new(io: TcpStream, activity: Arc<Activity>, limits: Arc<ConnectionLimits>) -> Self {
        let now = Instant::now();
        Watched {
            io,
            activity,
            limits,
            head_started: None,
            write_blocked_since: None,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            closing: None,
        }
    }

    /// Forgets a head that has since been read whole (a request started after it).
    fn head_pending(&mut self) -> Option<Instant> {
        let started = self.activity.started.load(Ordering::Relaxed);
        match self.head_started {
            Some((at, seen)) if seen == started => Some(at),
            _ => {
                self.head_started = None;
                None
            }
        }
    }
}

/// Arms `timer` for `deadline` and polls it: true once it has passed.
fn expired(timer: &mut Pin<Box<Sleep>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    if timer.deadline() != deadline {
        timer.as_mut().reset(deadline);
    }
    timer.as_mut().poll(cx).is_ready()
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let idle = this.activity.in_flight.load(Ordering::Relaxed) == 0;
                if buf.filled().len() > before && idle && this.head_pending().is_none() {
                    let started = this.activity.started.load(Ordering::Relaxed);
                    this.head_started = Some((Instant::now(), started));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.activity.in_flight.load(Ordering::Relaxed) > 0 {
                    // A request is being served: its body has its own rate limit, and nothing
                    // is idle. Idleness counts from when its response is sent.
                    return Poll::Pending;
                }
                if let Some(at) = this.head_pending() {
                    let deadline = at + this.limits.header_read_timeout;
                    if expired(&mut this.read_timer, deadline, cx) {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request headers not received in time",
                        )));
                    }
                } else {
                    let deadline = this.activity.idle_since() + this.limits.idle_timeout;
                    if expired(&mut this.read_timer, deadline, cx) {
                        // End of stream: hyper closes an idle connection quietly.
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl Watched {
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => {
                let since = *self.write_blocked_since.get_or_insert_with(Instant::now);
                let deadline = since + self.limits.idle_timeout;
                if expired(&mut self.write_timer, deadline, cx) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not read its response in time",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.write_blocked_since = None;
                ready
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.watch_write(cx, result)
    }

    /// Closes the sending side, then lingers (see the module docs): hyper awaits this before
    /// it drops the socket.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        }
        let (until, drain) = this
            .closing
            .get_or_insert_with(|| (Instant::now() + LINGER, Drain::default()));
        if drain.poll(&mut this.io, LINGER_BYTES, cx).is_ready()
            || expired(&mut this.read_timer, *until, cx)
        {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    body: Body,
    seen: Arc<AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.seen.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body held to a minimum average rate: by `grace + received / rate` after the
/// request began, what has come must be there, or the body fails with [`SlowBody`].
struct MinRateBody {
    body: Body,
    began: Instant,
    received: u64,
    rate: u64,
    grace: Duration,
    timer: Pin<Box<Sleep>>,
}

impl MinRateBody {
    fn new(body: Body, rate: u64, grace: Duration) -> Self {
        let began = Instant::now();
        MinRateBody {
            body,
            began,
            received: 0,
            rate,
            grace,
            timer: Box::pin(tokio::time::sleep_until(began + grace)),
        }
    }

    fn deadline(&self) -> Instant {
        let earned = Duration::from_secs_f64(self.received as f64 / self.rate as f64);
        self.began + self.grace + earned
    }
}

/// A request body that came slower than `min_body_rate` (answered `408`).
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than the server's minimum of {rate} bytes per second")]
pub struct SlowBody {
    pub rate: u64,
}

impl http_body::Body for MinRateBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let deadline = this.deadline();
                if expired(&mut this.timer, deadline, cx) {
                    return Poll::Ready(Some(Err(axum::Error::new(SlowBody { rate: this.rate }))));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `error` (a body-reading failure, through however many wrappers) is a [`SlowBody`].
pub fn slow_body<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a SlowBody> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(slow) = e.downcast_ref::<SlowBody>() {
            return Some(slow);
        }
        current = e.source();
    }
    None
}

/// The `Content-Length` a request declares, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
