//! The built-in app served directly by hyper, with no drover: the baseline
//! the benchmark suite (`bench/run`) measures drover against.
//!
//! It serves the very service drover's built-in app serves
//! (`drover::builtin::app`), with hyper 1's `http1` connection and
//! hyper-util's `TokioIo`, on a tokio current-thread runtime: one event loop,
//! the way a drover worker (or `--workers 1`, in-process) runs it.
//!
//! ```text
//! cargo run --release --example direct -- 8000              # one event loop
//! cargo run --release --example direct -- 8000 --threads 2  # two, one socket
//! ```
//!
//! `--threads N` runs N OS threads, each with its own current-thread runtime,
//! all accepting on the one listening socket: the in-process twin of
//! `drover --workers N` (N event loops on one socket), minus the processes.
//! (drover's crate builds tokio without `rt-multi-thread`, so a work-stealing
//! runtime is not available to an example of this crate.)
//!
//! Options: `PORT` (required; `0` picks one), `--host H` (default
//! `127.0.0.1`), `--threads N` (default 1), `--backlog B` (default 128, like
//! drover), `--drover-builder` (configure hyper's connection builder the way
//! drover's `serve` does: a tokio timer, a 30 s header-read timeout and a
//! 64 KiB buffer cap; isolates that part of drover's per-request cost).
//! `--fd N` serves an inherited listening socket instead of binding one
//! (no PORT then): `drover --workers 2 -- direct --fd 3` runs this very
//! server as drover's external command, each worker a process of its own
//! and drover off the data path - it splits "two processes instead of two
//! threads" from drover's own per-request work.
//! Prints `listening on ADDR` on stdout once accepting. Stops on SIGTERM or
//! SIGINT (default dispositions: the process just ends).

use std::net::SocketAddr;
use std::process::ExitCode;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;

fn usage() -> ExitCode {
    eprintln!(
        "usage: direct (PORT | --fd N) [--host H] [--threads N] [--backlog B] [--drover-builder]"
    );
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut port: Option<u16> = None;
    let mut host = String::from("127.0.0.1");
    let mut threads: usize = 1;
    let mut backlog: i32 = 128;
    let mut drover_builder = false;
    let mut fd: Option<i32> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let parsed = match a.as_str() {
            "--host" => args.next().map(|v| host = v).is_some(),
            "--threads" => args
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1)
                .map(|n| threads = n)
                .is_some(),
            "--backlog" => args
                .next()
                .and_then(|v| v.parse().ok())
                .map(|b| backlog = b)
                .is_some(),
            "--fd" => args
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 3)
                .map(|n| fd = Some(n))
                .is_some(),
            "--drover-builder" => {
                drover_builder = true;
                true
            }
            "-h" | "--help" => return usage(),
            p => p.parse().ok().map(|p| port = Some(p)).is_some(),
        };
        if !parsed {
            return usage();
        }
    }
    let socket = if let Some(fd) = fd {
        match inherited(fd) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("direct: fd {fd} is not a usable listening socket: {e}");
                return ExitCode::from(78);
            }
        }
    } else {
        let Some(port) = port else {
            return usage();
        };
        let addr: SocketAddr = match format!("{host}:{port}").parse() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("direct: bad address {host}:{port}: {e}");
                return ExitCode::from(64);
            }
        };
        // Bound the way drover binds: SO_REUSEADDR, then listen(backlog).
        match bind(addr, backlog) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("direct: cannot listen on {addr}: {e}");
                return ExitCode::from(78);
            }
        }
    };
    let local = match socket.local_addr() {
        Ok(a) => a.to_string(),
        Err(_) => "?".into(),
    };

    // The same service drover's built-in app serves, built once, like one
    // drover worker's (worker 0 of 1, null context).
    let svc = drover::builtin::app(drover::Worker {
        id: 0,
        workers: 1,
        context: serde_json::Value::Null,
        raw_context: serde_json::Value::Null,
    });

    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let std_listener = match socket.try_clone() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("direct: dup of the listener failed: {e}");
                return ExitCode::from(70);
            }
        };
        let svc = svc.clone();
        let h = std::thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || event_loop(std_listener, svc, drover_builder))
            .expect("spawn an event-loop thread");
        handles.push(h);
    }
    drop(socket);
    println!("listening on {local}");
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// The listening socket inherited as `fd` (socket activation: drover's
/// external-command workers get theirs as fd 3).
#[allow(unsafe_code)]
fn inherited(fd: i32) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: fd was inherited open from the parent and nothing else in
    // this process owns or closes it: it is taken over exactly once, here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let s = socket2::Socket::from(owned);
    if !s.is_listener()? {
        return Err(std::io::Error::other("not a listening socket"));
    }
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn bind(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// One event loop: a current-thread runtime accepting on the shared socket
/// and serving each connection with hyper's HTTP/1 connection.
fn event_loop(
    std_listener: std::net::TcpListener,
    svc: drover::builtin::Builtin,
    drover_builder: bool,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("register listener");
        let mut builder = http1::Builder::new();
        if drover_builder {
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .max_buf_size(64 * 1024);
        }
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly, like drover does.
                    eprintln!("direct: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc.clone());
            tokio::spawn(async move {
                // A client that goes away mid-request is not our concern here.
                let _ = conn.await;
            });
        }
    });
}
