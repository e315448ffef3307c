//! Watching `--worker-contexts-file`. A ConfigMap mounted as a volume is
//! updated by the kubelet with an atomic swap of a `..data` symlink in the
//! file's directory, so the directory is watched (inotify), not the file: any
//! change there makes the file be read again, and its content is reported
//! when it differs from the last read. Reads only; never starts anything.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc;

use crate::contexts::Update;

/// Changes often come in bursts (the kubelet writes a new directory, swaps
/// the link, deletes the old one): wait this long for the burst to end.
const SETTLE: Duration = Duration::from_millis(50);

/// A short, stable version for a file's content (FNV-1a, hex).
pub fn content_version(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Watches `path` and sends its content whenever it changes, starting from
/// the content `initial` already loaded. Runs on a thread of its own (a
/// blocking inotify read) until `tx` closes.
pub fn spawn(path: PathBuf, initial: String, tx: mpsc::UnboundedSender<Update>) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch {}: inotify unavailable", path.display());
            return;
        }
    };
    let mask = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    if let Err(e) = inotify.add_watch(&dir, mask) {
        tracing::warn!(error = %e, "cannot watch directory {}", dir.display());
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("contexts-file-watch".into())
        .spawn(move || {
            let origin = path.display().to_string();
            let mut last = initial;
            while !tx.is_closed() {
                if inotify.read_events().is_err() {
                    std::thread::sleep(SETTLE);
                    continue;
                }
                std::thread::sleep(SETTLE);
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => Ok(t),
                    // Mid-swap, or removed: report it; the workers keep their contexts.
                    Err(e) => Err(format!("cannot read {}: {e}", path.display())),
                };
                if let Ok(t) = &text {
                    if *t == last {
                        continue;
                    }
                    last = t.clone();
                }
                let version = text
                    .as_ref()
                    .map(|t| content_version(t))
                    .unwrap_or_default();
                if tx
                    .send(Update {
                        text,
                        origin: origin.clone(),
                        version,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the contexts file watch");
    }
}
