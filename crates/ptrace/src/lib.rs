//! leakscope-ptrace: the ptrace backend for fds, for when eBPF cannot be
//! used (no root, a verifier that refuses the program, no BTF).
//!
//! Input: a command to launch, or a running process to attach to.
//! Output: the same [`Event`]s as the eBPF backend (acquire, release,
//! close_range, fork, exec, exit, executable mappings) for the whole
//! process tree, and a [`RawStack::Copied`] per acquisition that the
//! stacks stage unwinds exactly as it does eBPF's copies.
//!
//! How: launched, the command installs a seccomp filter before its exec
//! (`SECCOMP_RET_TRACE` for fd-lifecycle syscalls only, as `strace
//! --seccomp-bpf` does), so the rest of its syscalls never stop it; the
//! filter is inherited by every descendant and fork, vfork, clone and exec
//! are followed from their first instruction (`PTRACE_O_TRACEFORK`, ...,
//! `PTRACE_O_EXITKILL`). A traced call stops at its entry
//! (`PTRACE_EVENT_SECCOMP`) and, except close(2), once more at its exit,
//! where `PTRACE_GET_SYSCALL_INFO` gives its number, arguments and result;
//! a successful acquisition copies the registers and the thread's stack
//! (sp up to the top of its stack, `process_vm_readv`). Attached
//! (`PTRACE_SEIZE`), no filter can be added to a running process: every
//! syscall stops twice, and only the fd ones are decoded. Signals,
//! exit codes and fd numbers stay the program's own. All ptrace calls are
//! made on one thread of leakscope (the tracer).
//!
//! ```no_run
//! use leakscope_event::Backend;
//! let mut tracer = leakscope_ptrace::Tracer::new(Default::default()).unwrap();
//! let child = tracer.spawn(&mut std::process::Command::new("/bin/true")).unwrap();
//! let mut events = Vec::new();
//! tracer.poll(std::time::Duration::from_millis(100), &mut |e| events.push(e)).unwrap();
//! ```
//!
//! It does not: trace TCP states, see ia32 or x32 syscalls of a 64-bit
//! kernel (they run untraced), unwind, symbolize, or decide what leaked.
#![deny(missing_docs)]

mod access;
mod filter;
mod proc;
mod trace;

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leakscope_event::{Event, Pid, RawStack, StackId};

/// Errors of the ptrace backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tracer thread could not be started.
    #[error("failed to start the ptrace tracer thread")]
    Thread(#[source] io::Error),
    /// ptrace is not permitted here.
    #[error("ptrace is not permitted: {reason}")]
    NotPermitted {
        /// Why, and what to change.
        reason: String,
    },
}

/// Tracer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Launch with a seccomp filter so that only fd syscalls stop the
    /// command (on by default); off, every syscall stops it.
    pub seccomp: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { seccomp: true }
    }
}

/// State the tracer thread shares with the pipeline's thread.
pub(crate) struct Shared {
    seccomp: bool,
    stacks: Mutex<HashMap<u64, RawStack>>,
    /// wait(2) statuses of processes the tracer reaped, by pid.
    statuses: Mutex<HashMap<u32, i32>>,
    detach: AtomicBool,
    detached: AtomicBool,
    tracer_tid: AtomicI32,
    /// PTRACE_GET_SYSCALL_INFO: 1 once it answered, -1 once it failed.
    syscall_info: AtomicI32,
}

/// The ptrace tracer: a thread that makes every ptrace call, and the
/// stream of its events.
pub struct Tracer {
    base: u64,
    shared: Arc<Shared>,
    requests: Sender<trace::Request>,
    events: Receiver<Event>,
    attached: bool,
}

/// A handle on the wait statuses of the processes the tracer reaped: a
/// launched command is the tracer's child, so only the tracer may wait
/// for it (another thread's waitpid would take its ptrace stops).
#[derive(Clone)]
pub struct Reaped(Arc<Shared>);

impl Reaped {
    /// The wait(2) status of `pid`, once it was reaped.
    pub fn status(&self, pid: Pid) -> Option<i32> {
        self.0.statuses.lock().unwrap().get(&pid.0).copied()
    }
}

pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether this process may use ptrace on its own children, and why not
/// with what to change (Yama's `ptrace_scope` 2 or 3, a container's
/// seccomp policy): a forked child asks to be traced, for real.
pub fn check() -> Result<(), Error> {
    match access::launch_refusal() {
        None => Ok(()),
        Some(reason) => Err(Error::NotPermitted { reason }),
    }
}

/// What `leakscope doctor` reports about ptrace here.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `kernel.yama.ptrace_scope` (None without Yama).
    pub ptrace_scope: Option<u32>,
    /// Whether leakscope itself runs with no_new_privs.
    pub no_new_privs: bool,
    /// Whether the kernel has seccomp filters (`Seccomp:` in
    /// /proc/self/status and CONFIG_SECCOMP_FILTER).
    pub seccomp_filter: bool,
    /// Whether PTRACE_GET_SYSCALL_INFO (Linux 5.3) decoded the stops of
    /// the traced `/bin/true`; None when nothing was traced.
    pub syscall_info: Option<bool>,
    /// Whether leakscope holds CAP_SYS_PTRACE (attach to any process).
    pub cap_sys_ptrace: bool,
    /// A launched child could be traced, seccomp-filtered, or why not.
    pub launch: Result<(), String>,
}

impl Facts {
    /// Which running processes `leakscope attach` may trace with ptrace
    /// here, when a launched child can be traced.
    pub fn attach_scope(&self) -> &'static str {
        match (self.ptrace_scope, self.cap_sys_ptrace) {
            (Some(3), _) => "none (kernel.yama.ptrace_scope=3)",
            (_, true) => "any process (CAP_SYS_PTRACE)",
            (Some(2), false) => "none without CAP_SYS_PTRACE (kernel.yama.ptrace_scope=2)",
            (Some(1), false) => {
                "only leakscope's own descendants (kernel.yama.ptrace_scope=1; \
                 `sysctl kernel.yama.ptrace_scope=0` as root lets an owner attach)"
            }
            _ => "its owner's processes (no set-user-ID ones)",
        }
    }
}

/// Looks at what ptrace needs here, and traces `/bin/true` for real.
pub fn facts() -> Facts {
    let ptrace_scope = access::ptrace_scope();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let no_new_privs = field("NoNewPrivs:").as_deref() == Some("1");
    let cap_sys_ptrace = field("CapEff:")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|c| c & (1 << 19) != 0);
    // SAFETY: PR_GET_SECCOMP takes no memory arguments.
    let seccomp_filter = field("Seccomp_filters:").is_some()
        || unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } >= 0;
    let mut syscall_info = None;
    let launch = (|| -> Result<(), String> {
        check().map_err(|e| e.to_string())?;
        let mut t = Tracer::new(Config::default()).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("/bin/true");
        cmd.stdout(std::process::Stdio::null());
        let child = leakscope_event::Backend::spawn(&mut t, &mut cmd)
            .map_err(|e| format!("tracing /bin/true failed: {e}"))?;
        let pid = Pid(child.id());
        let reaped = t.reaped();
        for _ in 0..200 {
            let _ = leakscope_event::Backend::poll(&mut t, Duration::from_millis(10), &mut |_| {});
            if reaped.status(pid).is_some() {
                let info = t.shared.syscall_info.load(Ordering::SeqCst);
                syscall_info = (info != 0).then_some(info > 0);
                if info < 0 {
                    return Err("PTRACE_GET_SYSCALL_INFO (Linux 5.3) failed: the stops of \
                                a traced /bin/true could not be decoded"
                        .into());
                }
                return Ok(());
            }
        }
        Err("a traced /bin/true did not finish within 2 s".into())
    })();
    Facts {
        ptrace_scope,
        no_new_privs,
        seccomp_filter,
        syscall_info,
        cap_sys_ptrace,
        launch,
    }
}

impl Tracer {
    /// Starts the tracer thread. Nothing is traced until
    /// [`Tracer::spawn`](leakscope_event::Backend::spawn) or
    /// [`Tracer::attach`](leakscope_event::Backend::attach).
    pub fn new(config: Config) -> Result<Tracer, Error> {
        check()?;
        let base = monotonic_ns();
        let shared = Arc::new(Shared {
            seccomp: config.seccomp,
            stacks: Mutex::default(),
            statuses: Mutex::default(),
            detach: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            tracer_tid: AtomicI32::new(0),
            syscall_info: AtomicI32::new(0),
        });
        let (requests, req_rx) = mpsc::channel();
        let (ev_tx, events) = mpsc::channel();
        let state = trace::State::new(shared.clone(), ev_tx, base);
        install_wakeup();
        std::thread::Builder::new()
            .name("leakscope-ptrace".into())
            .spawn(move || state.run(req_rx))
            .map_err(Error::Thread)?;
        Ok(Tracer {
            base,
            shared,
            requests,
            events,
            attached: false,
        })
    }

    /// The wait statuses of the processes the tracer reaps (the launched
    /// command's among them).
    pub fn reaped(&self) -> Reaped {
        Reaped(self.shared.clone())
    }

    /// Whether every syscall stops the tracee (attach mode, or seccomp
    /// filters unavailable), rather than only the fd ones.
    pub fn every_syscall(&self) -> bool {
        self.attached || !self.shared.seccomp
    }

    /// Detaches from every tracee and waits (up to `timeout`) until it is
    /// done; the processes run on untraced.
    pub fn detach(&mut self, timeout: Duration) {
        self.shared.detach.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        while !self.shared.detached.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            let tid = self.shared.tracer_tid.load(Ordering::SeqCst);
            if tid > 0 {
                // Interrupts the tracer's waitpid (EINTR) so it sees the
                // request.
                // SAFETY: tgkill(2) to a thread of this process.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, WAKEUP_SIGNAL);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<io::Result<T>>) -> trace::Request) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| io::Error::other("the ptrace tracer thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the ptrace tracer thread is gone"))?
    }
}

/// The signal that interrupts the tracer thread's waitpid: SIGURG, whose
/// default is to be ignored, given a handler without SA_RESTART.
const WAKEUP_SIGNAL: i32 = libc::SIGURG;

fn install_wakeup() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(WAKEUP_SIGNAL, &sa, std::ptr::null_mut());
    }
}

impl leakscope_event::Backend for Tracer {
    fn name(&self) -> &'static str {
        "ptrace"
    }

    fn time_base(&self) -> u64 {
        self.base
    }

    fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        let taken = std::mem::replace(cmd, Command::new(""));
        let (back, child) = self.ask(|tx| trace::Request::Spawn(taken, tx))?;
        *cmd = back;
        Ok(child)
    }

    fn attach(&mut self, pid: Pid) -> io::Result<()> {
        self.attached = true;
        self.ask(|tx| trace::Request::Attach(pid, tx))
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match self.events.recv_timeout(timeout) {
            Ok(ev) => sink(ev),
            Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(timeout);
                return Ok(());
            }
        }
        while let Ok(ev) = self.events.try_recv() {
            sink(ev);
        }
        Ok(())
    }

    fn raw_stack(&mut self, id: StackId) -> RawStack {
        self.shared
            .stacks
            .lock()
            .unwrap()
            .get(&id.0)
            .cloned()
            .unwrap_or_else(|| RawStack::Missing("stack released before it could be read".into()))
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.attached {
            notes.push(
                "ptrace attached: no seccomp filter can be added to a running process, so \
                 every syscall of the process stopped it twice while traced, each then \
                 taking tens of microseconds instead of a fraction of one (as under \
                 strace -p)"
                    .into(),
            );
        } else if !self.shared.seccomp {
            notes.push("ptrace without a seccomp filter: every syscall stopped the command".into());
        }
        notes
    }

    fn stop(&mut self) {
        if self.attached {
            self.detach(Duration::from_secs(2));
        }
    }
}
