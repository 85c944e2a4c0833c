//! A TCP fault proxy for the path between Envoy and the policy server.
//!
//! Envoy keeps its HTTP/2 connection to the policy cluster open, so a fault has to act on
//! live connections as well as new ones: `Delay` and `Blackhole` apply to every byte read
//! after the switch, `Reset`, `Garbage` and `Refuse` kill live connections at once. A
//! connection that lost bytes to a blackhole is reset when the fault is lifted, because its
//! HTTP/2 framing is no longer intact.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::{Acceptor, Handler};
use crate::util::{eventually, lock};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward bytes unchanged.
    Pass,
    /// Forward every chunk, in both directions, this much later.
    Delay(Duration),
    /// Accept and read, never forward nor answer.
    Blackhole,
    /// Accept, then close with RST (`SO_LINGER` 0); live connections are reset too.
    Reset,
    /// Answer whatever arrives with random bytes that are not HTTP/2, then close; live
    /// connections get the garbage at once.
    Garbage,
    /// Close the listener so connects are refused; live connections are reset.
    Refuse,
}

/// A running fault proxy on `127.0.0.1:0`; stops when dropped.
pub struct FaultProxy {
    acceptor: Arc<Acceptor>,
    shared: Arc<Shared>,
}

struct Shared {
    target: SocketAddr,
    fault: watch::Sender<Fault>,
    connections: AtomicU64,
    /// Live connections, so `set` can wait for the ones a fault ends.
    live: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    to_target: AtomicU64,
    from_target: AtomicU64,
    /// Chunks read but not yet written (held back by `Delay`).
    queued: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `target`, initially in `Fault::Pass`.
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        let (fault, _) = watch::channel(Fault::Pass);
        let shared = Arc::new(Shared {
            target,
            fault,
            connections: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            to_target: AtomicU64::new(0),
            from_target: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        });
        let handler_shared = shared.clone();
        let handler: Handler = Arc::new(move |stream, _peer| {
            let shared = handler_shared.clone();
            Box::pin(async move { serve(stream, shared).await })
        });
        let acceptor = Acceptor::bind(SocketAddr::from(([127, 0, 0, 1], 0)), handler)?;
        Ok(FaultProxy { acceptor, shared })
    }

    /// The proxy's address (what Envoy's policy cluster points at).
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.acceptor.addr().port()
    }

    /// Where traffic is forwarded.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Switches the fault for new and live connections. Once this returns, the live
    /// connections the fault ends are closed, a `Refuse` port refuses connects, and after
    /// `Pass` the
    /// bytes an earlier `Delay` held back have been delivered: a byte stream cannot overtake
    /// itself, so until then new traffic on a live connection would still be late.
    pub async fn set(&self, fault: Fault) -> Result<()> {
        if fault != Fault::Refuse {
            self.acceptor.reopen()?;
        }
        self.shared.fault.send_replace(fault);
        // Wait for the live connections this fault ends, so the caller's next request
        // cannot race a connection that is about to be reset.
        let doomed: Vec<u64> = lock(&self.shared.live)
            .iter()
            .filter(|(_, c)| c.ends_under(fault))
            .map(|(id, _)| *id)
            .collect();
        eventually(
            Duration::from_secs(10),
            "faulted connections to close",
            || async {
                let live = lock(&self.shared.live);
                doomed.iter().all(|id| !live.contains_key(id)).then_some(())
            },
        )
        .await?;
        match fault {
            // Live connections see the watch change and reset themselves.
            Fault::Refuse => self.acceptor.close(false).await,
            Fault::Pass => {
                eventually(
                    Duration::from_secs(30),
                    "delayed bytes to drain",
                    || async { (self.shared.queued.load(Ordering::SeqCst) == 0).then_some(()) },
                )
                .await?;
            }
            Fault::Delay(_) | Fault::Blackhole | Fault::Reset | Fault::Garbage => {}
        }
        Ok(())
    }

    /// Connections accepted since start (or the last `reset_counters`).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections currently open on the client side.
    pub fn active_connections(&self) -> u64 {
        lock(&self.shared.live).len() as u64
    }

    /// Bytes written to the target.
    pub fn bytes_to_target(&self) -> u64 {
        self.shared.to_target.load(Ordering::SeqCst)
    }

    /// Bytes written back to clients from the target.
    pub fn bytes_from_target(&self) -> u64 {
        self.shared.from_target.load(Ordering::SeqCst)
    }

    /// Zeroes the connection and byte counters (not `active_connections`).
    pub fn reset_counters(&self) {
        self.shared.connections.store(0, Ordering::SeqCst);
        self.shared.to_target.store(0, Ordering::SeqCst);
        self.shared.from_target.store(0, Ordering::SeqCst);
    }
}

/// What `set` needs to know about a live connection.
#[derive(Default)]
struct ConnState {
    /// Bytes were swallowed by a blackhole: the stream is broken.
    tainted: AtomicBool,
    /// Accepted during a blackhole or garbage fault, never connected to the target.
    detached: AtomicBool,
}

impl ConnState {
    /// Whether switching to `fault` ends this connection (mirrors `pump`).
    fn ends_under(&self, fault: Fault) -> bool {
        match fault {
            Fault::Reset | Fault::Garbage | Fault::Refuse => true,
            Fault::Pass | Fault::Delay(_) => {
                self.tainted.load(Ordering::SeqCst) || self.detached.load(Ordering::SeqCst)
            }
            Fault::Blackhole => false,
        }
    }
}

/// Removes a connection from the live set when its task ends.
struct LiveGuard<'a> {
    live: &'a Mutex<HashMap<u64, Arc<ConnState>>>,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        lock(self.live).remove(&self.id);
    }
}

/// How a connection ends.
enum End {
    /// Both directions finished normally.
    Done,
    /// Close the client side with RST.
    Reset,
    /// Send garbage to the client, then close.
    Garbage,
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let state = Arc::new(ConnState::default());
    lock(&shared.live).insert(id, state.clone());
    let _live = LiveGuard {
        live: &shared.live,
        id,
    };
    let mut fault_rx = shared.fault.subscribe();
    let at_accept = *fault_rx.borrow_and_update();

    let mut upstream = match at_accept {
        // Refuse: accepted in the instant before the listener closed.
        Fault::Reset | Fault::Refuse => return reset(client),
        Fault::Garbage | Fault::Blackhole => {
            state.detached.store(true, Ordering::SeqCst);
            None
        }
        Fault::Pass | Fault::Delay(_) => {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(shared.target))
                .await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Some(stream)
                }
                // The target is down: make the client see a hard failure, as it would
                // without the proxy.
                _ => return reset(client),
            }
        }
    };

    let end = pump(&mut client, &mut upstream, &mut fault_rx, &shared, &state).await;
    match end {
        End::Done => {}
        End::Reset => {
            if let Some(upstream) = upstream {
                reset(upstream);
            }
            reset(client);
        }
        End::Garbage => {
            let _ = client.write_all(&garbage()).await;
            let _ = client.shutdown().await;
            // Drain briefly so the close does not turn into an RST that hides the garbage.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    }
}

async fn pump(
    client: &mut TcpStream,
    upstream: &mut Option<TcpStream>,
    fault_rx: &mut watch::Receiver<Fault>,
    shared: &Shared,
    state: &ConnState,
) -> End {
    let mut to_upstream = Queue::new(&shared.queued);
    let mut to_client = Queue::new(&shared.queued);
    let (mut client_eof, mut upstream_eof) = (false, upstream.is_none());
    let (mut upstream_shut, mut client_shut) = (false, false);
    let mut client_buf = vec![0u8; 16 * 1024];
    let mut upstream_buf = vec![0u8; 16 * 1024];

    loop {
        if client_eof && to_upstream.is_empty() && !upstream_shut {
            if let Some(up) = upstream.as_mut() {
                let _ = up.shutdown().await;
            }
            upstream_shut = true;
        }
        if upstream_eof && to_client.is_empty() && !client_shut && upstream.is_some() {
            let _ = client.shutdown().await;
            client_shut = true;
        }
        if client_eof
            && (upstream_eof || upstream.is_none())
            && to_upstream.is_empty()
            && to_client.is_empty()
        {
            return End::Done;
        }
        let next_up = to_upstream.next_due();
        let next_client = to_client.next_due();

        tokio::select! {
            read = client.read(&mut client_buf), if !client_eof => match read {
                Ok(0) => client_eof = true,
                Ok(n) => match *fault_rx.borrow() {
                    Fault::Pass => to_upstream.push(Instant::now(), &client_buf[..n]),
                    Fault::Delay(d) => to_upstream.push(Instant::now() + d, &client_buf[..n]),
                    Fault::Blackhole => state.tainted.store(true, Ordering::SeqCst),
                    Fault::Garbage => return End::Garbage,
                    Fault::Reset | Fault::Refuse => return End::Reset,
                },
                Err(_) => return End::Reset,
            },
            read = read_opt(upstream, &mut upstream_buf), if !upstream_eof => match read {
                Ok(0) => upstream_eof = true,
                Ok(n) => match *fault_rx.borrow() {
                    Fault::Pass => to_client.push(Instant::now(), &upstream_buf[..n]),
                    Fault::Delay(d) => to_client.push(Instant::now() + d, &upstream_buf[..n]),
                    Fault::Blackhole => state.tainted.store(true, Ordering::SeqCst),
                    Fault::Garbage => return End::Garbage,
                    Fault::Reset | Fault::Refuse => return End::Reset,
                },
                // The target died hard: pass that on.
                Err(_) => return End::Reset,
            },
            () = sleep_until_opt(next_up) => {
                if let (Some((_, bytes)), Some(up)) = (to_upstream.pop(), upstream.as_mut()) {
                    if up.write_all(&bytes).await.is_err() {
                        return End::Reset;
                    }
                    shared.to_target.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                }
            },
            () = sleep_until_opt(next_client) => {
                if let Some((_, bytes)) = to_client.pop() {
                    if client.write_all(&bytes).await.is_err() {
                        return End::Reset;
                    }
                    shared.from_target.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                }
            },
            changed = fault_rx.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
                let fault = *fault_rx.borrow_and_update();
                match fault {
                    Fault::Reset | Fault::Refuse => return End::Reset,
                    Fault::Garbage => return End::Garbage,
                    Fault::Blackhole => {
                        // Whatever is queued is swallowed too.
                        if !to_upstream.is_empty() || !to_client.is_empty() {
                            state.tainted.store(true, Ordering::SeqCst);
                        }
                        to_upstream.clear();
                        to_client.clear();
                    }
                    Fault::Pass | Fault::Delay(_) => {
                        if state.ends_under(fault) {
                            // Bytes were lost (or there never was a target connection):
                            // the stream is broken, make the client reconnect.
                            return End::Reset;
                        }
                    }
                }
            },
        }
    }
}

/// Chunks waiting for their due time, counted in `FaultProxy`'s `queued` while held.
struct Queue<'a> {
    chunks: VecDeque<(Instant, Bytes)>,
    queued: &'a AtomicU64,
}

impl<'a> Queue<'a> {
    fn new(queued: &'a AtomicU64) -> Self {
        Self {
            chunks: VecDeque::new(),
            queued,
        }
    }

    fn push(&mut self, due: Instant, bytes: &[u8]) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.chunks.push_back((due, Bytes::copy_from_slice(bytes)));
    }

    fn pop(&mut self) -> Option<(Instant, Bytes)> {
        let chunk = self.chunks.pop_front()?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        Some(chunk)
    }

    fn next_due(&self) -> Option<Instant> {
        self.chunks.front().map(|(due, _)| *due)
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn clear(&mut self) {
        self.queued
            .fetch_sub(self.chunks.len() as u64, Ordering::SeqCst);
        self.chunks.clear();
    }
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

async fn read_opt(stream: &mut Option<TcpStream>, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Some(stream) => stream.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0 turns the close into an RST.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// 64 bytes that cannot start an HTTP/2 (or HTTP/1) exchange: a frame header with a length
/// far beyond any max frame size, then noise.
fn garbage() -> Vec<u8> {
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    let mut out = vec![0xff, 0xff, 0xff, 0xee];
    while out.len() < 64 {
        // xorshift64: enough randomness for noise, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(64);
    out
}
