//! The one listening socket: bound once, before any worker exists, and shared
//! by every worker process (as fd 3). This module owns binding, the backlog
//! and its kernel cap, and the end of accepting; it never serves a request.
//!
//! # Ending accept without resetting queued connections
//! Closing a listening socket resets every connection still waiting in its
//! accept queue, and the queue lives as long as any process holds the socket.
//! So the drain first shuts new connections out while leaving the queue
//! alone ([`Listener::stop_new`]): a socket filter that drops every incoming
//! packet on the listener (the clients' SYNs are dropped and retried, so they
//! see a refusal only once the socket is closed), plus `listen(fd, 0)`.
//! `listen(fd, 0)` alone is not enough: Linux still completes one handshake
//! into an empty queue, and that connection is reset when the socket closes.
//! Connections already queued are separate sockets the filter does not touch;
//! they stay and are accepted and served: drover's own workers accept until
//! `EAGAIN` before closing their copy, and for external workers the
//! supervisor waits until the queue is empty before sending `--stop-signal`.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{Error, Result};

/// Where the listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (the real port when 0 was asked for).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The bound, listening socket, owned by the supervisor.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// Its address.
    pub addr: ListenAddr,
    /// The backlog in force: the one asked for, capped by `net.core.somaxconn`.
    pub effective_backlog: u32,
    /// Removes the Unix socket file when the supervisor is done with it.
    _uds: Option<UdsFile>,
}

/// Reads `net.core.somaxconn` of this network namespace.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Resolves `host` (an address or a name) and `port` to the address to
/// bind, as `drover check` and a run both do; `what` qualifies the address
/// in messages (e.g. " (admin)").
pub fn resolve(host: &str, port: u16, what: &str) -> Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let shown = if bare.contains(':') {
        format!("[{bare}]:{port}{what}")
    } else {
        format!("{bare}:{port}{what}")
    };
    (bare, port)
        .to_socket_addrs()
        .map_err(|e| Error::Listen {
            addr: shown.clone(),
            reason: format!("`{host}` is not an address or a resolvable host name ({e})"),
            source: Some(e),
        })?
        .next()
        .ok_or_else(|| Error::Listen {
            addr: shown,
            reason: format!("`{host}` resolves to no address"),
            source: None,
        })
}

impl Listener {
    /// Binds what the plan says.
    pub fn bind(plan: &crate::plan::ListenPlan) -> Result<Listener> {
        match &plan.at {
            crate::plan::ListenAt::Tcp(addr) => {
                Listener::bind_tcp(*addr, plan.backlog, plan.balance == Balance::Reuseport)
            }
            crate::plan::ListenAt::Unix(path) => Listener::bind_unix(path, plan.backlog),
        }
    }

    /// Binds TCP `addr` with `backlog`; with `reuseport`, as the first socket
    /// of a `SO_REUSEPORT` group that [`Listener::join`] adds to.
    pub fn bind_tcp(addr: SocketAddr, backlog: u32, reuseport: bool) -> Result<Listener> {
        let fail = |e: io::Error| Error::Listen {
            addr: addr.to_string(),
            reason: match e.kind() {
                io::ErrorKind::AddrInUse => {
                    "address already in use (another process listens on it)".into()
                }
                io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
                }
                io::ErrorKind::AddrNotAvailable => "no local interface has this address".into(),
                _ => e.to_string(),
            },
            source: Some(e),
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
        socket.set_reuse_address(true).map_err(fail)?;
        // Linux copies TCP_NODELAY to every accepted socket: an app that
        // takes the inherited socket for a Unix one and never sets it
        // (uvicorn) would otherwise wait for a delayed ACK (about 40 ms) on
        // every keep-alive response it writes in two parts. Servers that
        // bind for themselves set it; this gives them the same.
        socket.set_tcp_nodelay(true).map_err(fail)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            // `::` serves IPv4 too, whatever net.ipv6.bindv6only says.
            socket.set_only_v6(false).map_err(fail)?;
        }
        if reuseport {
            socket.set_reuse_port(true).map_err(fail)?;
        }
        socket.bind(&addr.into()).map_err(fail)?;
        let (socket, effective) = listen(socket, backlog).map_err(fail)?;
        let local = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(addr);
        Ok(Listener {
            socket,
            addr: ListenAddr::Tcp(local),
            effective_backlog: effective,
            _uds: None,
        })
    }

    /// Binds a Unix socket at `path`. A stale socket file (nobody listening)
    /// is replaced; a live one, or any other file, is an error.
    pub fn bind_unix(path: &Path, backlog: u32) -> Result<Listener> {
        let fail = |reason: String| Error::Listen {
            addr: format!("unix:{}", path.display()),
            reason,
            source: None,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(fail("a file that is not a socket exists there".into()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail(
                    "address already in use (another process listens on it)".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        let socket =
            Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|e| fail(e.to_string()))?;
        let addr = SockAddr::unix(path).map_err(|e| fail(e.to_string()))?;
        socket.bind(&addr).map_err(|e| fail(e.to_string()))?;
        // From here on the file is ours: remove it on every exit path.
        let guard = UdsFile(path.to_path_buf());
        let (socket, effective) = listen(socket, backlog).map_err(|e| fail(e.to_string()))?;
        Ok(Listener {
            socket,
            addr: ListenAddr::Unix(path.to_path_buf()),
            effective_backlog: effective,
            _uds: Some(guard),
        })
    }

    /// Another socket of this one's `SO_REUSEPORT` group (same address,
    /// options and backlog): the next index of the group. Only for a TCP
    /// listener bound with `reuseport`.
    pub fn join(&self) -> io::Result<Listener> {
        let ListenAddr::Tcp(addr) = self.addr else {
            return Err(io::Error::other("a Unix socket has no SO_REUSEPORT group"));
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_tcp_nodelay(true)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(self.effective_backlog.min(i32::MAX as u32) as i32)?;
        let fd = crate::sys::high_fd(OwnedFd::from(socket))?;
        Ok(Listener {
            socket: Socket::from(fd),
            addr: self.addr.clone(),
            effective_backlog: self.effective_backlog,
            _uds: None,
        })
    }

    /// Stops new connections from completing, keeping the queued ones
    /// (see the module doc). Affects every process holding the socket.
    pub fn stop_new(&self) -> io::Result<()> {
        shut_out(socket2::SockRef::from(&self.socket))
    }

    /// Connections waiting in the accept queue now (TCP only).
    pub fn queued(&self) -> Option<u32> {
        crate::sys::listen_queue(self.socket.as_raw_fd()).map(|(q, _)| q)
    }

    /// The backlog the kernel enforces now (TCP only): an app that calls
    /// `listen()` again on the inherited socket changes it for everyone.
    pub fn kernel_backlog(&self) -> Option<u32> {
        crate::sys::listen_queue(self.socket.as_raw_fd()).map(|(_, b)| b)
    }

    /// Applies `backlog` again (after an app re-listened with its own).
    pub fn relisten(&self, backlog: u32) -> io::Result<()> {
        self.socket.listen(backlog.min(i32::MAX as u32) as i32)
    }

    /// A duplicate of the descriptor (for reading its accept queue).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.socket.as_fd().try_clone_to_owned()
    }

    /// The descriptor, for handing to workers.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Turns the supervisor's copy into a serving listener (in-process mode).
    pub fn into_serving(self) -> io::Result<(ServeListener, Option<UdsFile>)> {
        let Listener { socket, _uds, .. } = self;
        Ok((ServeListener::from_fd(socket.into())?, _uds))
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// How new connections are spread over the workers (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Balance {
    /// One socket shared by every worker: whoever accepts first takes the
    /// connection (drover's own workers defer to less busy peers).
    #[default]
    Shared,
    /// One socket per worker in a `SO_REUSEPORT` group held by the
    /// supervisor, which steers each new connection to the next worker that
    /// is up.
    Reuseport,
}

/// Sends every new connection of `fd`'s `SO_REUSEPORT` group to one of the
/// sockets at `indexes` (positions in the order the group's sockets were
/// bound in), picked at random for each connection: a classic BPF program
/// (`SO_ATTACH_REUSEPORT_CBPF`) the kernel runs on each SYN. It applies to
/// the whole group.
pub(crate) fn steer(fd: impl AsFd, indexes: &[usize]) -> io::Result<()> {
    let mut prog = steering_program(indexes);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // The kernel copies the program out of `prog` during the call.
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)
        .map_err(io::Error::from)
}

/// `ret #i` for one index; for several, a random number modulo their count
/// and a jump table.
fn steering_program(indexes: &[usize]) -> Vec<libc::sock_filter> {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_ALU_MOD_K: u16 = 0x94;
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let ret = |i: usize| op(BPF_RET_K, 0, 0, i as u32);
    match indexes {
        [] => vec![op(BPF_RET_K, 0, 0, u32::MAX)],
        [only] => vec![ret(*only)],
        _ => {
            let random = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
            let mut p = vec![
                op(BPF_LD_W_ABS, 0, 0, random),
                op(BPF_ALU_MOD_K, 0, 0, indexes.len() as u32),
            ];
            let (last, rest) = indexes.split_last().expect("two or more");
            for (k, &i) in rest.iter().enumerate() {
                // Equal: the `ret` right after; else skip it.
                p.push(op(BPF_JEQ_K, 0, 1, k as u32));
                p.push(ret(i));
            }
            p.push(ret(*last));
            p
        }
    }
}

/// A classic BPF program of one instruction, `ret #0`: drop the packet.
const DROP_ALL: [socket2::SockFilter; 1] = [socket2::SockFilter::new(0x06, 0, 0, 0)];

/// Shuts new connections out of a listening socket, keeping its queue.
fn shut_out(socket: socket2::SockRef<'_>) -> io::Result<()> {
    if socket.local_addr()?.is_unix() {
        // A Unix socket's new clients are shut out by removing its file.
        return socket.listen(0);
    }
    socket.attach_filter(&DROP_ALL)?;
    socket.listen(0)
}

fn listen(socket: Socket, backlog: u32) -> io::Result<(Socket, u32)> {
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    let cap = somaxconn().unwrap_or(u32::MAX);
    let effective = backlog.min(cap);
    if effective < backlog {
        tracing::warn!(
            backlog,
            somaxconn = cap,
            "the kernel caps the listen backlog at net.core.somaxconn={cap}; raise it (pod securityContext.sysctls) to get {backlog}"
        );
    }
    let fd = crate::sys::high_fd(OwnedFd::from(socket))?;
    Ok((Socket::from(fd), effective))
}

/// Removes a Unix socket file when dropped.
#[derive(Debug)]
pub struct UdsFile(PathBuf);

impl Drop for UdsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A listener being served by a tokio runtime (in a worker, or in-process).
/// Held through `AsyncFd`, so that the accept loop can see that a
/// connection waits *before* it takes it, and leave it to a less busy
/// worker (see `serve`).
#[derive(Debug)]
pub enum ServeListener {
    /// TCP.
    Tcp(AsyncFd<std::net::TcpListener>),
    /// Unix.
    Unix(AsyncFd<std::os::unix::net::UnixListener>),
}

impl ServeListener {
    /// Wraps an inherited or owned listening descriptor. Sets O_NONBLOCK, which
    /// lives on the shared open file description: only drover's own workers,
    /// all of which want it, ever share a socket made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<ServeListener> {
        let socket = Socket::from(fd);
        socket.set_nonblocking(true)?;
        let is_unix = socket.local_addr()?.is_unix();
        Ok(if is_unix {
            let std: std::os::unix::net::UnixListener = OwnedFd::from(socket).into();
            ServeListener::Unix(crate::sys::async_listener(std)?)
        } else {
            let std: std::net::TcpListener = OwnedFd::from(socket).into();
            ServeListener::Tcp(crate::sys::async_listener(std)?)
        })
    }

    /// Stops new connections from completing (see the module doc).
    pub fn stop_new(&self) {
        let r = match self {
            ServeListener::Tcp(l) => shut_out(socket2::SockRef::from(l.get_ref())),
            ServeListener::Unix(l) => shut_out(socket2::SockRef::from(l.get_ref())),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot shut new connections out of the shared socket");
        }
    }

    /// Accepts one connection. Each time one is waiting, `defer` is asked
    /// first: `Some(d)` leaves it for `d` (to another process) and asks again.
    pub async fn accept(
        &self,
        defer: &mut dyn FnMut() -> Option<std::time::Duration>,
    ) -> io::Result<Stream> {
        loop {
            match self {
                ServeListener::Tcp(l) => {
                    let mut ready = l.readable().await?;
                    if let Some(d) = defer() {
                        drop(ready);
                        tokio::time::sleep(d).await;
                        continue;
                    }
                    match ready.try_io(|l| l.get_ref().accept()) {
                        Ok(r) => return tcp_stream(r?.0),
                        Err(_would_block) => continue,
                    }
                }
                ServeListener::Unix(l) => {
                    let mut ready = l.readable().await?;
                    if let Some(d) = defer() {
                        drop(ready);
                        tokio::time::sleep(d).await;
                        continue;
                    }
                    match ready.try_io(|l| l.get_ref().accept()) {
                        Ok(r) => return unix_stream(r?.0),
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }

    /// Accepts, without waiting, every connection the kernel has queued, then
    /// closes this process's copy of the socket.
    pub fn drain_queue(self) -> Vec<Stream> {
        let mut out = Vec::new();
        match self {
            ServeListener::Tcp(l) => {
                let l = l.into_inner();
                while let Ok((s, _)) = l.accept() {
                    out.extend(tcp_stream(s).ok());
                }
            }
            ServeListener::Unix(l) => {
                let l = l.into_inner();
                while let Ok((s, _)) = l.accept() {
                    out.extend(unix_stream(s).ok());
                }
            }
        }
        out
    }
}

/// An accepted TCP connection, ready for tokio.
fn tcp_stream(s: std::net::TcpStream) -> io::Result<Stream> {
    let _ = s.set_nodelay(true);
    s.set_nonblocking(true)?;
    Ok(Stream::Tcp(tokio::net::TcpStream::from_std(s)?))
}

/// An accepted Unix connection, ready for tokio.
fn unix_stream(s: std::os::unix::net::UnixStream) -> io::Result<Stream> {
    s.set_nonblocking(true)?;
    Ok(Stream::Unix(tokio::net::UnixStream::from_std(s)?))
}

/// An accepted connection.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix.
    Unix(tokio::net::UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steering program, run by the kernel: a group of three sockets on
    /// loopback, connections sent to one, then spread over two of them.
    #[test]
    fn steering_sends_new_connections_to_the_chosen_sockets_of_the_group() {
        let first = Listener::bind_tcp("127.0.0.1:0".parse().unwrap(), 128, true).unwrap();
        let group = [first.join().unwrap(), first.join().unwrap()];
        let socks = [&first, &group[0], &group[1]];
        let ListenAddr::Tcp(addr) = first.addr else {
            unreachable!()
        };
        let queues = || {
            socks
                .iter()
                .map(|s| s.queued().unwrap())
                .collect::<Vec<_>>()
        };
        let mut keep = Vec::new();
        steer(&first, &[1]).unwrap();
        for _ in 0..3 {
            keep.push(std::net::TcpStream::connect(addr).unwrap());
        }
        assert_eq!(queues(), [0, 3, 0]);
        steer(&group[1], &[0, 2]).unwrap();
        for _ in 0..40 {
            keep.push(std::net::TcpStream::connect(addr).unwrap());
        }
        let q = queues();
        assert_eq!(q[1], 3, "{q:?}");
        assert_eq!(q[0] + q[2], 40, "{q:?}");
        assert!(q[0] > 5 && q[2] > 5, "spread at random: {q:?}");
    }

    #[test]
    fn the_steering_program_is_a_jump_table_over_a_random_number() {
        assert_eq!(steering_program(&[4]).len(), 1);
        assert_eq!(steering_program(&[4])[0].k, 4);
        let p = steering_program(&[1, 3, 7]);
        assert_eq!(p.len(), 2 + 2 * 2 + 1);
        assert_eq!(p[1].k, 3, "modulo the count");
        let rets: Vec<u32> = p.iter().filter(|i| i.code == 0x06).map(|i| i.k).collect();
        assert_eq!(rets, [1, 3, 7]);
        // 1024 workers fit the kernel's 4096-instruction limit.
        assert!(steering_program(&(0..1024).collect::<Vec<_>>()).len() <= 4096);
    }
}
