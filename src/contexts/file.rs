//! Reading and watching a mounted file: `--worker-contexts-file`, and the
//! admin token file. Reads only; never starts anything.
//!
//! # Only whole, regular files
//! [`read_regular`] opens with `O_NONBLOCK` and checks with `fstat` before
//! reading a byte: a FIFO, socket or device is refused at once (a FIFO would
//! otherwise block the reader until some writer shows up), and so is a file
//! larger than the caller's limit (nothing is read into memory unbounded).
//!
//! # Watching
//! A ConfigMap or Secret mounted as a volume is updated by the kubelet with
//! an atomic swap of a `..data` symlink in the file's directory, so the
//! directory is watched (inotify), not the file. A change is read only once
//! it is complete and stable:
//! - *complete*: a writer closed the file (`IN_CLOSE_WRITE`), or something
//!   was renamed, created, deleted or re-attributed in the directory (the
//!   kubelet's swap, `mv`, an editor's save). A bare `IN_MODIFY` never
//!   triggers a read: a writer that truncates, pauses, then writes (through
//!   one open) has not closed the file yet, and its empty intermediate
//!   state must never be applied. Further events postpone the read
//!   ([`SETTLE`] after the last one: bursts end first);
//! - *stable*: two reads [`SETTLE`] apart agree; else it waits again.
//!
//! What is read is reported when it differs from the last report.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc;

use crate::contexts::{Update, MAX_CONTEXTS_BYTES};

/// Changes often come in bursts (the kubelet writes a new directory, swaps
/// the link, deletes the old one): wait this long after the last event, and
/// this long between the two reads that must agree.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How often a watch with nothing to do checks whether anyone still listens.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A short, stable version for a file's content (FNV-1a, hex).
pub fn content_version(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What a file is, in words, when it is not a regular file.
fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Reads the whole of `path`, which must be a regular file (symlinks are
/// followed) of at most `limit` bytes. Never blocks on a FIFO or device and
/// never reads more than `limit + 1` bytes. The errors say what was wrong.
pub fn read_regular(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind};
    // A socket cannot be opened at all (ENXIO): say what it is rather than
    // "No such device or address".
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "it is a socket, not a regular file",
            ));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind_of(&ft)),
        ));
    }
    if meta.len() > limit as u64 {
        return Err(too_large(meta.len(), limit));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // The file may grow between fstat and read: read one byte past the limit.
    (&mut file).take(limit as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > limit {
        return Err(too_large(buf.len() as u64, limit));
    }
    Ok(buf)
}

fn too_large(size: u64, limit: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "it is {size} bytes, more than the limit of {limit} bytes ({} KiB)",
            limit / 1024
        ),
    )
}

/// Reads a contexts file: a regular file of at most [`MAX_CONTEXTS_BYTES`],
/// in UTF-8.
pub fn read_contexts(path: &Path) -> std::io::Result<String> {
    let bytes = read_regular(path, MAX_CONTEXTS_BYTES)?;
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is not UTF-8 text ({e})"),
        )
    })
}

/// Watches `path` and calls `report` with its content (or why it cannot be
/// read) whenever a complete, stable change differs from the last report,
/// starting from `initial`. `read` reads the file. Runs on a thread of its
/// own until `report` returns false.
pub fn watch_file<T>(
    path: PathBuf,
    what: &'static str,
    initial: std::io::Result<T>,
    read: impl Fn(&Path) -> std::io::Result<T> + Send + 'static,
    mut report: impl FnMut(std::io::Result<T>) -> bool + Send + 'static,
    alive: impl Fn() -> bool + Send + 'static,
) where
    T: PartialEq + Clone + Send + 'static,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the {what} {}: inotify unavailable", path.display());
            return;
        }
    };
    let complete = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_Q_OVERFLOW;
    if let Err(e) = inotify.add_watch(&dir, complete | AddWatchFlags::IN_MODIFY) {
        tracing::warn!(error = %e, "cannot watch directory {} for the {what}", dir.display());
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            let mut last = initial;
            // When the pending change is to be read; None: nothing pending.
            let mut due: Option<Instant> = None;
            loop {
                if !alive() {
                    return;
                }
                let wait = due
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(IDLE_CHECK);
                let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, timeout);
                while let Ok(events) = inotify.read_events() {
                    for ev in events {
                        let now = Instant::now();
                        if ev.mask.intersects(complete) {
                            due = Some(now + SETTLE);
                        } else if let Some(d) = &mut due {
                            // Still being written: postpone, never advance.
                            *d = (*d).max(now + SETTLE);
                        }
                    }
                }
                match due {
                    Some(d) if d <= Instant::now() => {}
                    _ => continue,
                }
                due = None;
                let first = read(&path);
                std::thread::sleep(SETTLE);
                let second = read(&path);
                if !same(&first, &second) {
                    // Still changing: look again after it settles.
                    due = Some(Instant::now() + SETTLE);
                    continue;
                }
                if same(&second, &last) {
                    continue;
                }
                last = match &second {
                    Ok(v) => Ok(v.clone()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                let sent = report(second);
                if !sent {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the watch of the {what}");
    }
}

/// Two reads agree: the same content, or errors saying the same thing.
fn same<T: PartialEq>(a: &std::io::Result<T>, b: &std::io::Result<T>) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => x.kind() == y.kind() && x.to_string() == y.to_string(),
        _ => false,
    }
}

/// Watches the contexts file `path` and sends its content whenever it
/// changes, starting from the content `initial` already loaded, until `tx`
/// closes.
pub fn spawn(path: PathBuf, initial: String, tx: mpsc::UnboundedSender<Update>) {
    let origin = path.display().to_string();
    let alive = {
        let tx = tx.clone();
        move || !tx.is_closed()
    };
    watch_file(
        path,
        "worker contexts file",
        Ok(initial),
        |p: &Path| read_contexts(p),
        move |got| {
            let text = got.map_err(|e| format!("cannot read {origin}: {e}"));
            let version = text
                .as_ref()
                .map(|t| content_version(t))
                .unwrap_or_default();
            tx.send(Update {
                text,
                origin: origin.clone(),
                version,
            })
            .is_ok()
        },
        alive,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tmp("fifo");
        let p = d.join("ctx.yaml");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_regular(&p, 1024).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_socket_is_refused_saying_so() {
        let d = tmp("sock");
        let p = d.join("ctx.yaml");
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let e = read_regular(&p, 1024).unwrap_err();
        assert!(e.to_string().contains("socket, not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn devices_and_directories_are_refused() {
        let e = read_regular(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_regular(Path::new("/"), 1024).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_naming_both_sizes() {
        let d = tmp("big");
        let p = d.join("ctx.yaml");
        std::fs::write(&p, vec![b'x'; 2048]).unwrap();
        let e = read_regular(&p, 1024).unwrap_err();
        assert!(
            e.to_string().contains("2048 bytes") && e.to_string().contains("1024"),
            "{e}"
        );
        assert_eq!(read_regular(&p, 2048).unwrap().len(), 2048);
        let _ = std::fs::remove_dir_all(&d);
    }
}
