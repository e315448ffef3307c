//! Process-level system calls: the only module of drover that uses `unsafe`.
//!
//! It owns starting a worker process (fork + exec), the prctl calls that make
//! drover a correct PID 1, and moving descriptors out of the way of the fds a
//! worker is promised (3 and 4). Nothing else in the crate forks, dups onto a
//! fixed number or calls prctl.
//!
//! # Why fork + exec, and why it is sound here
//! The supervisor runs a tokio runtime, an admin server and (for the ConfigMap
//! source) a Kubernetes client, so it has threads. After `fork` in a threaded
//! process the child holds a copy of only the forking thread, and any lock
//! another thread held (the allocator's, stdio's, tracing's) stays locked
//! forever. The child therefore runs only async-signal-safe system calls on
//! memory prepared *before* the fork, then `execve`s: the built-in and library
//! apps re-exec drover's own binary (`/proc/self/exe`) in worker mode, external
//! commands exec the resolved program. This is the spawn model of mpservice's
//! `start_server`, without Python's cost. A single-threaded fork server would
//! also work, but re-exec keeps one code path for built-in and external
//! workers and lets a replacement worker be started at any time from a running
//! supervisor.
//!
//! Every buffer the child touches (argv, envp, the `LISTEN_PID` and
//! `WATCHDOG_PID` slots) is built
//! by [`Spawn::new`] in the parent; the child writes only into those slots, which
//! are its own copy-on-write pages.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The lowest descriptor number [`high_fd`] hands out. Descriptors a worker
/// receives are dup2'ed onto 3 and 4; keeping every source at or above this
/// number means a `dup2` onto 3 can never clobber the source of the 4.
pub const HIGH_FD_BASE: RawFd = 10;

/// The environment variables whose value the child fills in with its own
/// pid (sd_listen_fds(3) and sd_watchdog(3) check them against getpid()).
const PID_VARS: [&[u8]; 2] = [b"LISTEN_PID", b"WATCHDOG_PID"];

/// Moves `fd` to a close-on-exec descriptor numbered at least
/// [`HIGH_FD_BASE`], so that the fixed numbers workers expect stay free.
pub fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= HIGH_FD_BASE {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor
    // that nothing else owns; wrapping it in an OwnedFd gives it one owner.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD_BASE) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Makes this process the reaper of its orphaned descendants
/// (`PR_SET_CHILD_SUBREAPER`), so a worker's own children that it leaves
/// behind are reparented to drover and reaped, even when drover is not PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments reads and writes no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Everything a child needs, prepared in the parent so the child allocates
/// nothing.
pub struct Spawn {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Indexes into `envp` of the `LISTEN_PID=` and `WATCHDOG_PID=` entries.
    pid_vars: Vec<usize>,
    /// (source, target) pairs: the child dup2s each source onto its target.
    fds: Vec<(RawFd, RawFd)>,
    /// Put the child in a process group of its own, so a terminal's Ctrl-C
    /// reaches only the supervisor (which then drains everybody in order), and
    /// so the supervisor can kill a worker together with its own children.
    new_process_group: bool,
}

impl Spawn {
    /// Prepares `program` with `args` (argv[0] included) and the complete
    /// environment `env`. Entries `LISTEN_PID` and `WATCHDOG_PID` in `env`
    /// are rewritten in the child to the child's own pid.
    pub fn new(
        program: &OsStr,
        args: &[&OsStr],
        env: &[(Vec<u8>, Vec<u8>)],
        fds: &[(RawFd, RawFd)],
    ) -> io::Result<Spawn> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte")
            })
        };
        let program = cstr(program.as_bytes())?;
        let argv: Vec<CString> = args
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        let mut pid_vars = Vec::new();
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in env {
            if k.contains(&0) || k.contains(&b'=') || v.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "environment variable contains a NUL byte or a bad name",
                ));
            }
            let mut entry = Vec::with_capacity(k.len() + v.len() + 24);
            entry.extend_from_slice(k);
            entry.push(b'=');
            if PID_VARS.contains(&k.as_slice()) {
                pid_vars.push(envp.len());
                // Room for any pid: the child writes the digits and a NUL.
                entry.extend_from_slice(&[b'0'; 20]);
            } else {
                entry.extend_from_slice(v);
            }
            entry.push(0);
            envp.push(entry);
        }
        let mut envp_ptrs: Vec<*const libc::c_char> =
            envp.iter().map(|e| e.as_ptr().cast()).collect();
        envp_ptrs.push(std::ptr::null());
        for &(src, _) in fds {
            if src < HIGH_FD_BASE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "descriptor handed to a worker must come from high_fd()",
                ));
            }
        }
        Ok(Spawn {
            program,
            _argv: argv,
            argv_ptrs,
            envp,
            envp_ptrs,
            pid_vars,
            fds: fds.to_vec(),
            new_process_group: true,
        })
    }

    /// Forks and execs. Returns the child's pid once `execve` has succeeded,
    /// or the errno of the failed `execve` (the child has then exited 127).
    pub fn spawn(&mut self) -> io::Result<libc::pid_t> {
        // A close-on-exec pipe reports a failed exec: the child writes its
        // errno; a successful exec closes the write end and the read sees EOF.
        let mut pipe = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (err_r, err_w) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };

        let parent = std::process::id() as libc::pid_t;
        // Where the child writes its pid: right after `NAME=` of each entry,
        // which has room for 20 digits and a NUL. A fixed array, built here,
        // so the child only reads it.
        let mut pid_slots: [*mut u8; PID_VARS.len()] = [std::ptr::null_mut(); PID_VARS.len()];
        for (slot, &i) in pid_slots.iter_mut().zip(&self.pid_vars) {
            let name = self.envp[i].iter().position(|&b| b == b'=').expect("NAME=") + 1;
            // SAFETY: the entry has name + 20 + 1 bytes (see new).
            *slot = unsafe { self.envp[i].as_mut_ptr().add(name) };
        }
        // The empty signal set is built before the fork (sigemptyset is
        // async-signal-safe, but there is no reason to do work in the child).
        let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset initialises the set we own.
        unsafe { libc::sigemptyset(&mut empty) };

        // SAFETY: see the module doc. Between fork and execve the child calls
        // only async-signal-safe functions (sigprocmask, signal, prctl,
        // getppid, setpgid, fcntl, dup2, syscall(close_range), execve, write,
        // _exit, getpid) on memory prepared above, and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe { self.child(err_w.as_raw_fd(), parent, &pid_slots, &empty) }
        }
        drop(err_w);
        let mut errno = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            // SAFETY: reading into our own buffer from our own descriptor.
            let n =
                unsafe { libc::read(err_r.as_raw_fd(), errno[got..].as_mut_ptr().cast(), 4 - got) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            got += n as usize;
        }
        if got == 4 {
            // The child exited 127 right after writing; the supervisor's
            // reaper collects it like any other exit.
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        Ok(pid)
    }

    /// The child side. Never returns.
    ///
    /// # Safety
    /// Only to be called in the child right after `fork`.
    unsafe fn child(
        &self,
        err_w: RawFd,
        parent: libc::pid_t,
        pid_slots: &[*mut u8; PID_VARS.len()],
        empty: &libc::sigset_t,
    ) -> ! {
        let fail = |err_w: RawFd| -> ! {
            let e = *libc::__errno_location();
            let b = e.to_ne_bytes();
            libc::write(err_w, b.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        // Signal state: tokio's handlers are reset by execve, but the mask is
        // inherited and Rust's runtime ignores SIGPIPE, which execve keeps.
        libc::sigprocmask(libc::SIG_SETMASK, empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Die with the supervisor. The death signal is tied to the forking
        // thread: the supervisor forks only from its main thread, which lives
        // as long as the process. Checking getppid afterwards closes the race
        // where the supervisor died before the prctl.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(err_w);
        }
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        if self.new_process_group {
            libc::setpgid(0, 0);
        }
        // Sources are all >= HIGH_FD_BASE (checked in new), so no dup2 onto a
        // target can overwrite a later source. dup2 clears FD_CLOEXEC on the
        // new descriptor.
        for &(src, dst) in &self.fds {
            if libc::dup2(src, dst) < 0 {
                fail(err_w);
            }
        }
        // Close every other descriptor above stderr that the targets and the
        // error pipe do not use, even ones drover itself inherited without
        // CLOEXEC: a worker holds exactly what the contract names.
        let mut keep: [RawFd; 8] = [-1; 8];
        let mut nkeep = 0;
        for &(_, dst) in &self.fds {
            if nkeep < 7 {
                keep[nkeep] = dst;
                nkeep += 1;
            }
        }
        keep[nkeep] = err_w;
        nkeep += 1;
        // Insertion sort on a stack array: no allocation.
        for i in 1..nkeep {
            let mut j = i;
            while j > 0 && keep[j - 1] > keep[j] {
                keep.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut next: RawFd = 3;
        for &k in &keep[..nkeep] {
            if k > next {
                libc::syscall(
                    libc::SYS_close_range,
                    next as libc::c_uint,
                    (k - 1) as libc::c_uint,
                    0,
                );
            }
            if k + 1 > next {
                next = k + 1;
            }
        }
        libc::syscall(
            libc::SYS_close_range,
            next as libc::c_uint,
            libc::c_uint::MAX,
            0,
        );

        let me = libc::getpid() as u64;
        for &slot in pid_slots {
            if !slot.is_null() {
                write_decimal(slot, me);
            }
        }
        libc::execve(
            self.program.as_ptr(),
            self.argv_ptrs.as_ptr(),
            self.envp_ptrs.as_ptr(),
        );
        fail(err_w)
    }
}

/// Writes `n` in decimal followed by a NUL at `dst` (at most 21 bytes).
///
/// # Safety
/// `dst` must point to at least 21 writable bytes.
unsafe fn write_decimal(dst: *mut u8, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = buf.len() - i;
    std::ptr::copy_nonoverlapping(buf[i..].as_ptr(), dst, len);
    *dst.add(len) = 0;
}

/// Sends `sig` to the process group led by `pid` (a worker and the children
/// it started). Errors such as "no such process" are ignored: the group is
/// gone either way.
pub fn kill_group(pid: libc::pid_t, sig: libc::c_int) -> bool {
    // SAFETY: kill with integer arguments touches no memory.
    unsafe { libc::kill(-pid, sig) == 0 }
}

/// Sends `sig` to one process. Returns false if it no longer exists.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> bool {
    // SAFETY: kill with integer arguments touches no memory.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Takes ownership of a descriptor that this process inherited by contract
/// (a worker's fd 3 and 4), after checking that it is open.
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Mark it close-on-exec: a worker hands it on to nobody.
    // SAFETY: as above, F_SETFD only changes the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the supervisor placed this descriptor for this process only, and
    // nothing else in the process refers to it by number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A shared-memory region made of 64-bit atomic words, backed by a memfd so
/// that it survives `execve` (an anonymous `MAP_SHARED` mapping would not):
/// the supervisor creates it and hands the fd to each worker, which maps the
/// same pages. All access goes through `AtomicU64`, so processes never race.
pub struct SharedWords {
    ptr: *mut std::sync::atomic::AtomicU64,
    words: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is only ever accessed through atomics, which are Sync,
// and it lives until Drop unmaps it.
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Creates a zeroed region of `words` 64-bit words.
    pub fn create(name: &str, words: usize) -> io::Result<SharedWords> {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a
        // new descriptor that we then own.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = high_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
        let len = words * 8;
        // SAFETY: ftruncate on our own descriptor; new pages read as zero.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, words)
    }

    /// Maps a region received from the supervisor.
    pub fn open(fd: OwnedFd) -> io::Result<SharedWords> {
        // SAFETY: fstat writes into the zeroed struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, st.st_size as usize / 8)
    }

    fn map(fd: OwnedFd, words: usize) -> io::Result<SharedWords> {
        if words == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty shared region",
            ));
        }
        // SAFETY: a fresh shared mapping of the whole file; the kernel picks
        // the address. It is page-aligned, so every 8-byte word is aligned
        // for AtomicU64.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                words * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedWords {
            ptr: ptr.cast(),
            words,
            fd,
        })
    }

    /// The words.
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds `words` initialised (zero or written)
        // u64s for as long as self lives; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }

    /// The descriptor, for handing to a worker.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; no reference
        // into it outlives self (words() borrows self).
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

/// Current accept-queue length and its limit of a listening TCP socket, from
/// `TCP_INFO` (for a listener the kernel reports the queue in `tcpi_unacked`
/// and the backlog in `tcpi_sacked`).
pub fn listen_queue(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: getsockopt writes at most `len` bytes into the struct we own.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_LISTEN from the kernel's tcp_states.h.
    const TCP_LISTEN: u8 = 10;
    (rc == 0 && info.tcpi_state == TCP_LISTEN).then_some((info.tcpi_unacked, info.tcpi_sacked))
}

/// An exited child, with the CPU time it and its reaped children used.
pub struct Exited {
    /// Its pid.
    pub pid: libc::pid_t,
    /// The exit code, or None when a signal ended it.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
}

/// Reaps child `pid` (or any child, for -1) if it has exited, without
/// blocking (`wait4(pid, WNOHANG)`), with the CPU time it used.
pub fn reap(target: libc::pid_t) -> Option<Exited> {
    loop {
        let mut status = 0;
        // SAFETY: wait4 writes the status and the rusage we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = unsafe { libc::wait4(target, &mut status, libc::WNOHANG, &mut ru) };
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if pid <= 0 {
            return None;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            continue; // stopped/continued: not an exit
        };
        return Some(Exited {
            pid,
            code,
            signal,
            cpu_seconds: secs(ru.ru_utime) + secs(ru.ru_stime),
        });
    }
}

/// Registers a listener that `inner` owns with the tokio reactor, for
/// readability.
pub fn async_listener<T: std::os::fd::AsRawFd>(
    inner: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor (a std listener) and the AsyncFd
    // takes `inner` by value: the descriptor stays open for as long as it is
    // registered, and AsyncFd deregisters it before giving `inner` back
    // (`into_inner`) or dropping it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
            .map_err(io::Error::from)
    }
}

/// Blocks `signals` in the calling thread (and in every thread it starts
/// later), so that a signal that arrives before its handler exists waits
/// instead of taking its default action (a TERM in drover's first
/// milliseconds must start a drain, not kill it).
pub fn block_signals(signals: &[libc::c_int]) {
    set_mask(libc::SIG_BLOCK, signals);
}

/// Unblocks `signals` in the calling thread: pending ones are delivered now.
pub fn unblock_signals(signals: &[libc::c_int]) {
    set_mask(libc::SIG_UNBLOCK, signals);
}

fn set_mask(how: libc::c_int, signals: &[libc::c_int]) {
    // SAFETY: the set is a local we initialise before use; pthread_sigmask
    // only reads it and changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// The realtime signals applications may use (`SIGRTMIN..=SIGRTMAX`, past
/// the ones the C library keeps for itself).
pub fn realtime_signals() -> std::ops::RangeInclusive<libc::c_int> {
    libc::SIGRTMIN()..=libc::SIGRTMAX()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_nul_terminated() {
        let mut buf = [b'x'; 21];
        unsafe { write_decimal(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
        unsafe { write_decimal(buf.as_mut_ptr(), 0) };
        assert_eq!(&buf[..2], b"0\0");
    }
}

/// The signal the kernel queues to the steering thread, with the socket's
/// descriptor, each time a connection lands on a steered socket
/// (`--balance reuseport`): a realtime signal, so that none is merged.
pub fn landing_signal() -> libc::c_int {
    libc::SIGRTMAX() - 1
}

/// Blocks the landing signal and SIGIO (what the kernel sends instead when
/// the realtime queue is full) in the calling thread and returns a signalfd
/// that reads them.
pub fn landing_signals() -> io::Result<OwnedFd> {
    // SAFETY: the set lives on this stack across the calls that take it;
    // signalfd returns a new descriptor that is owned at once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, landing_signal());
        libc::sigaddset(&mut set, libc::SIGIO);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// A landing read from [`landing_signals`]'s descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// A connection landed on the socket with this descriptor.
    On(RawFd),
    /// Landings were lost (the realtime queue was full).
    Lost,
}

/// Reads every landing queued on `sfd` into `out`.
pub fn read_landings(sfd: BorrowedFd<'_>, out: &mut Vec<Landing>) -> io::Result<()> {
    let mut buf: [libc::signalfd_siginfo; 32] = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: reads whole siginfo records into a local array of that size.
        let n = unsafe {
            libc::read(
                sfd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(()),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        let records = n as usize / std::mem::size_of::<libc::signalfd_siginfo>();
        for info in &buf[..records] {
            // The kernel's SIGIO codes (POLL_IN, ...) are positive; a signal
            // someone sent (SI_USER, SI_QUEUE) is not a landing.
            if info.ssi_code <= 0 {
                continue;
            }
            out.push(if info.ssi_signo as libc::c_int == landing_signal() {
                Landing::On(info.ssi_fd)
            } else {
                Landing::Lost
            });
        }
        if records < buf.len() {
            return Ok(());
        }
    }
}

/// Asks the kernel to queue [`landing_signal`] to the calling thread each
/// time `fd` (a listening socket) has a new connection (`O_ASYNC` with
/// `F_SETOWN_EX` to this thread and `F_SETSIG`). The settings belong to the
/// socket's open file, which the workers share; none of them acts on the
/// workers (the signal goes to this thread only), and setting `O_NONBLOCK`
/// the usual ways (FIONBIO, or F_SETFL with the flags read back) keeps
/// `O_ASYNC`.
pub fn signal_on_input(fd: BorrowedFd<'_>) -> io::Result<()> {
    // Linux's <asm-generic/fcntl.h> values (the libc crate lacks them).
    const F_SETSIG: libc::c_int = 10;
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_TID: libc::c_int = 0;
    #[repr(C)]
    struct FOwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: nix::unistd::gettid().as_raw(),
    };
    let fd = fd.as_raw_fd();
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: fcntl on a descriptor we hold, with a struct that lives
    // across the call.
    unsafe {
        check(libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx))?;
        check(libc::fcntl(fd, F_SETSIG, landing_signal()))?;
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        check(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC))?;
    }
    Ok(())
}
