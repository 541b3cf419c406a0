//! The tracer thread: every ptrace call and every wait happens here, on
//! the thread that forked the command (ptrace(2): the tracer is a thread).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use leakscope_event::{Acquire, Event, Fd, FdKind, Mapping, Pid, RawStack, StackId, Tid, TimeNs};

use crate::{filter, proc, Shared};

/// What the pipeline asks of the tracer thread.
pub(crate) enum Request {
    Spawn(Command, Sender<io::Result<(Command, Child)>>),
    Attach(Pid, Sender<io::Result<()>>),
}

const OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACESECCOMP;

/// `struct ptrace_syscall_info` (linux/ptrace.h, Linux 5.3), as words.
const INFO_WORDS: usize = 11;
const OP_ENTRY: u8 = 1;
const OP_EXIT: u8 = 2;
const OP_SECCOMP: u8 = 3;
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;

/// The most of a thread's stack copied at an acquisition, as the eBPF
/// backend does (the unwinder says where a deeper stack was cut).
const STACK_MAX: u64 = 256 * 1024;

struct Task {
    pid: u32,
    /// The call stopped at its entry, waiting for its exit: (name, args).
    pending: Option<(&'static str, [u64; 6])>,
    /// The mapping holding this thread's stack, once found.
    stack: Option<(u64, u64)>,
}

/// fd number -> stack id, per fd table; a stack is kept while some table
/// holds an fd acquired with it, and for good once its holder exited
/// holding it (a leak).
#[derive(Default, Clone)]
struct Table {
    fds: HashMap<i32, u64>,
}

pub(crate) struct State {
    shared: Arc<Shared>,
    events: Sender<Event>,
    base: u64,
    /// Every syscall stops (attach: no filter can be added to a running
    /// process), rather than only the filtered ones.
    every_syscall: bool,
    seized: bool,
    tasks: HashMap<i32, Task>,
    threads: HashMap<u32, HashSet<i32>>,
    /// Tasks that stopped before their parent's fork event: held stopped
    /// until the fork is in the stream.
    early: HashSet<i32>,
    /// New tasks whose first stop is still to come (resumed at once).
    expect_stop: HashSet<i32>,
    table_of: HashMap<u32, u64>,
    tables: HashMap<u64, Table>,
    refs: HashMap<u64, u32>,
    next_table: u64,
    next_stack: u64,
    start_stack: HashMap<u32, u64>,
    pidfds: HashMap<u32, i32>,
    /// The stack captured for the syscall being decoded.
    cur_stack: Option<u64>,
}

impl State {
    pub(crate) fn new(shared: Arc<Shared>, events: Sender<Event>, base: u64) -> State {
        State {
            shared,
            events,
            base,
            every_syscall: false,
            seized: false,
            tasks: HashMap::new(),
            threads: HashMap::new(),
            early: HashSet::new(),
            expect_stop: HashSet::new(),
            table_of: HashMap::new(),
            tables: HashMap::new(),
            refs: HashMap::new(),
            next_table: 1,
            next_stack: 1,
            start_stack: HashMap::new(),
            pidfds: HashMap::new(),
            cur_stack: None,
        }
    }

    pub(crate) fn run(mut self, requests: Receiver<Request>) {
        // SAFETY: gettid(2) cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        self.shared.tracer_tid.store(tid, Ordering::SeqCst);
        loop {
            if self.shared.detach.load(Ordering::SeqCst) && !self.tasks.is_empty() {
                self.detach_all();
                continue;
            }
            if self.tasks.is_empty() {
                match requests.recv() {
                    Ok(r) => self.request(r),
                    Err(_) => return,
                }
                continue;
            }
            while let Ok(r) = requests.try_recv() {
                self.request(r);
            }
            let mut status = 0;
            // __WNOTHREAD: only this thread's children and tracees, never
            // a child another thread of leakscope waits for.
            // SAFETY: plain wait.
            let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::__WNOTHREAD) };
            if tid < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    _ => {
                        // ECHILD: every tracee is gone.
                        let gone: Vec<i32> = self.tasks.keys().copied().collect();
                        for t in gone {
                            self.task_gone(t, None);
                        }
                        continue;
                    }
                }
            }
            self.on_wait(tid, status);
        }
    }

    fn now(&self) -> TimeNs {
        TimeNs(crate::monotonic_ns().saturating_sub(self.base))
    }

    fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn request(&mut self, r: Request) {
        match r {
            Request::Spawn(cmd, reply) => {
                let _ = reply.send(self.spawn(cmd));
            }
            Request::Attach(pid, reply) => {
                let _ = reply.send(self.attach(pid));
            }
        }
    }

    fn spawn(&mut self, mut cmd: Command) -> io::Result<(Command, Child)> {
        let prog = self.shared.seccomp.then(filter::program);
        self.every_syscall = prog.is_none();
        // SAFETY: the hook makes raw syscalls only (no allocation, no
        // locks) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(p) = &prog {
                    filter::install(p)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        // Without PTRACE_O_TRACEEXEC yet, the exec stops the child with
        // SIGTRAP before its first instruction (ptrace(2)).
        let mut status = 0;
        // SAFETY: plain wait for our own child.
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if !libc::WIFSTOPPED(status) {
            self.shared
                .statuses
                .lock()
                .unwrap()
                .insert(pid as u32, status);
            return Ok((cmd, child));
        }
        // SAFETY: our stopped tracee.
        let ok = unsafe {
            libc::ptrace(
                libc::PTRACE_SETOPTIONS,
                pid,
                0,
                (OPTIONS | libc::PTRACE_O_EXITKILL) as libc::c_long,
            )
        };
        if ok != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        self.new_process(pid as u32, None, false);
        self.tasks.insert(pid, task(pid as u32));
        self.threads.entry(pid as u32).or_default().insert(pid);
        self.exec_happened(pid, pid);
        self.resume(pid, 0);
        Ok((cmd, child))
    }

    /// Seizes every thread of `pid` (PTRACE_SEIZE, then PTRACE_INTERRUPT
    /// so that each restarts with PTRACE_SYSCALL). Threads it creates
    /// meanwhile: a seized thread's new threads are followed by
    /// PTRACE_O_TRACECLONE, and /proc/PID/task is read again until it
    /// lists none not seized (one created by a thread not yet seized).
    fn attach(&mut self, pid: Pid) -> io::Result<()> {
        self.every_syscall = true;
        self.seized = true;
        let p = pid.0 as i32;
        self.new_process(pid.0, None, false);
        let mut tried = HashSet::new();
        loop {
            let tids: Vec<i32> = match std::fs::read_dir(format!("/proc/{p}/task")) {
                Ok(dir) => dir
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|t| !tried.contains(t))
                    .collect(),
                Err(e) if tried.is_empty() => return Err(crate::access::attach_error(pid.0, &e)),
                Err(_) => Vec::new(), // it exited meanwhile
            };
            if tids.is_empty() {
                break;
            }
            // The thread-group leader first: its refusal is the process's.
            let mut tids = tids;
            tids.sort_by_key(|t| (*t != p, *t));
            for t in tids {
                tried.insert(t);
                // SAFETY: PTRACE_SEIZE takes no memory arguments.
                let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, t, 0, OPTIONS as libc::c_long) };
                if r != 0 {
                    let e = io::Error::last_os_error();
                    if t == p {
                        return Err(crate::access::attach_error(pid.0, &e));
                    }
                    // A thread that just exited, or one a seized thread
                    // created (already ours: its clone event adds it).
                    continue;
                }
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, t, 0, 0) };
                self.tasks.insert(t, task(pid.0));
                self.threads.entry(pid.0).or_default().insert(t);
                self.expect_stop.insert(t);
            }
        }
        let time = self.now();
        for mapping in proc::exec_mappings(p) {
            self.emit(Event::Map { time, pid, mapping });
        }
        Ok(())
    }

    /// Detaches from every tracee (attach mode's end), leaving each
    /// running as it was (or stopped, if job control stopped it): each is
    /// stopped with PTRACE_INTERRUPT, then let go with the signal it was
    /// about to get. Tasks a fork or clone created meanwhile are waited
    /// for and let go too, so that none is left in a ptrace stop.
    fn detach_all(&mut self) {
        let detach = |t: i32, sig: i32| {
            // SAFETY: a stopped tracee.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, t, 0, sig as libc::c_long) };
        };
        // Held in their first stop: already stopped.
        for t in std::mem::take(&mut self.early) {
            detach(t, 0);
        }
        let tids: Vec<i32> = self.tasks.keys().copied().collect();
        for &t in &tids {
            // SAFETY: our tracee.
            unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, t, 0, 0) };
        }
        let mut left: HashSet<i32> = tids.into_iter().collect();
        // Every tracee stops or exits within microseconds of the
        // interrupt; the limit only guards against a kernel surprise.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !left.is_empty() && std::time::Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: plain wait.
            let t = unsafe {
                libc::waitpid(
                    -1,
                    &mut status,
                    libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG,
                )
            };
            if t == 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            if t < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break; // ECHILD: no tracee left
            }
            if !libc::WIFSTOPPED(status) {
                left.remove(&t);
                self.task_gone(t, Some(status));
                continue;
            }
            let event = (status >> 16) & 0xff;
            let sig = libc::WSTOPSIG(status);
            if [
                libc::PTRACE_EVENT_FORK,
                libc::PTRACE_EVENT_VFORK,
                libc::PTRACE_EVENT_CLONE,
            ]
            .contains(&event)
            {
                // The new task was seized with its parent: it stops too.
                let mut msg: libc::c_ulong = 0;
                // SAFETY: `msg` receives the new task's id.
                unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, t, 0, &mut msg) };
                if msg != 0 {
                    left.insert(msg as i32);
                }
            }
            // A signal on its way in (a signal-delivery-stop) is handed
            // over with the detach; a seized tracee's group-stop is a
            // PTRACE_EVENT_STOP, after which it stays stopped untraced.
            let pass = if event == 0 && sig != (libc::SIGTRAP | 0x80) {
                sig
            } else {
                0
            };
            detach(t, pass);
            left.remove(&t);
        }
        self.tasks.clear();
        self.threads.clear();
        self.expect_stop.clear();
        for (_, fd) in self.pidfds.drain() {
            // SAFETY: our own pidfd.
            unsafe { libc::close(fd) };
        }
        self.shared.detached.store(true, Ordering::SeqCst);
    }

    fn resume(&self, tid: i32, sig: i32) {
        let req = if self.every_syscall {
            libc::PTRACE_SYSCALL
        } else {
            libc::PTRACE_CONT
        };
        // SAFETY: a stopped tracee (ESRCH when it was killed meanwhile).
        unsafe { libc::ptrace(req, tid, 0, sig as libc::c_long) };
    }

    fn on_wait(&mut self, tid: i32, status: i32) {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.task_gone(tid, Some(status));
            return;
        }
        if !libc::WIFSTOPPED(status) {
            return;
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if !self.tasks.contains_key(&tid) {
            // A new task's first stop, before its parent's fork event.
            self.early.insert(tid);
            return;
        }
        if self.expect_stop.remove(&tid)
            && (sig == libc::SIGSTOP || event == libc::PTRACE_EVENT_STOP)
        {
            if event == libc::PTRACE_EVENT_STOP && is_stop_signal(sig) {
                // Seized while job control had it stopped: it stays
                // stopped until SIGCONT, as untraced.
                // SAFETY: a seized tracee in group-stop.
                unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid, 0, 0) };
            } else {
                self.resume(tid, 0);
            }
            return;
        }
        match event {
            libc::PTRACE_EVENT_SECCOMP => self.syscall_stop(tid),
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK | libc::PTRACE_EVENT_CLONE => {
                self.on_clone(tid, event);
                self.resume(tid, 0);
            }
            libc::PTRACE_EVENT_EXEC => {
                let mut former: libc::c_ulong = 0;
                // SAFETY: `former` receives the event message.
                unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut former) };
                self.exec_happened(tid, former as i32);
                self.resume(tid, 0);
            }
            libc::PTRACE_EVENT_STOP => {
                // A group-stop of a seized tracee: it stays stopped, as
                // job control wants, until SIGCONT (PTRACE_LISTEN).
                if is_stop_signal(sig) {
                    // SAFETY: a seized tracee in group-stop.
                    unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid, 0, 0) };
                } else {
                    self.resume(tid, 0);
                }
            }
            0 if sig == libc::SIGTRAP | 0x80 => self.syscall_stop(tid),
            0 => {
                // A signal-delivery-stop, or (not seized) a group-stop,
                // which PTRACE_GETSIGINFO tells apart (ptrace(2)): the
                // signal goes on to the tracee as it would untraced.
                let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `si` receives the siginfo.
                let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, tid, 0, &mut si) };
                if r != 0 {
                    // Group-stop of a tracee we did not seize: it cannot
                    // stay stopped under ptrace without PTRACE_LISTEN,
                    // so it runs on (as under strace).
                    self.resume(tid, 0);
                } else {
                    self.resume(tid, sig);
                }
            }
            _ => self.resume(tid, 0),
        }
    }

    fn syscall_info(&self, tid: i32) -> Option<(u8, [u64; INFO_WORDS])> {
        let mut words = [0u64; INFO_WORDS];
        // SAFETY: the buffer is as large as we say.
        let n = unsafe {
            libc::ptrace(
                PTRACE_GET_SYSCALL_INFO,
                tid,
                std::mem::size_of_val(&words),
                words.as_mut_ptr(),
            )
        };
        let ok = if n > 0 { 1 } else { -1 };
        let _ =
            self.shared
                .syscall_info
                .compare_exchange(0, ok, Ordering::SeqCst, Ordering::SeqCst);
        (n > 0).then(|| ((words[0] & 0xff) as u8, words))
    }

    fn syscall_stop(&mut self, tid: i32) {
        let Some((op, w)) = self.syscall_info(tid) else {
            self.resume(tid, 0);
            return;
        };
        match op {
            OP_ENTRY | OP_SECCOMP => {
                let nr = w[3];
                let args = [w[4], w[5], w[6], w[7], w[8], w[9]];
                match filter::name_of(nr) {
                    Some("close") => {
                        // close(2) releases the fd even when it fails
                        // with EINTR; EBADF means nothing was open. Taken
                        // at entry: no second stop for the commonest call.
                        let pid = self.tasks[&tid].pid;
                        self.release(pid, args[0] as i32);
                        self.resume(tid, 0);
                    }
                    Some(name) => {
                        if let Some(t) = self.tasks.get_mut(&tid) {
                            t.pending = Some((name, args));
                        }
                        // The exit stop follows this one (Linux 4.8).
                        // SAFETY: a stopped tracee.
                        unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid, 0, 0) };
                    }
                    None => self.resume(tid, 0),
                }
            }
            OP_EXIT => {
                let pending = self.tasks.get_mut(&tid).and_then(|t| t.pending.take());
                if let Some((name, args)) = pending {
                    let ret = w[3] as i64;
                    self.syscall_exit(tid, name, args, ret);
                }
                self.resume(tid, 0);
            }
            _ => self.resume(tid, 0),
        }
    }

    fn syscall_exit(&mut self, tid: i32, name: &'static str, a: [u64; 6], ret: i64) {
        let pid = self.tasks[&tid].pid;
        let time = self.now();
        self.cur_stack = None;
        match name {
            "close_range" => {
                if ret == 0 {
                    let (first, last) = (a[0].min(i32::MAX as u64), a[1].min(i32::MAX as u64));
                    let cloexec_only = a[2] & libc::CLOSE_RANGE_CLOEXEC as u64 != 0;
                    if !cloexec_only {
                        self.release_range(pid, first as i32, last as i32);
                    }
                    self.emit(Event::CloseRange {
                        time,
                        pid: Pid(pid),
                        first: Fd(first as i32),
                        last: Fd(last as i32),
                        cloexec_only,
                    });
                }
                return;
            }
            "connect" => {
                if ret == 0 || ret == -(libc::EINPROGRESS as i64) {
                    if let Some((l, r)) = self.sock_addrs(pid, a[0] as i32) {
                        self.emit(Event::Describe {
                            time,
                            pid: Pid(pid),
                            fd: Fd(a[0] as i32),
                            detail: format!("{l} -> {r}"),
                        });
                    }
                }
                return;
            }
            "mmap" => {
                if (-4095..0).contains(&ret) || (a[4] as i32) < 0 {
                    return;
                }
                if let Some(path) = proc::fd_path(pid as i32, a[4] as i32) {
                    self.emit(Event::Map {
                        time,
                        pid: Pid(pid),
                        mapping: Mapping {
                            start: leakscope_event::AbsAddr(ret as u64),
                            end: leakscope_event::AbsAddr(ret as u64 + a[1]),
                            offset: leakscope_event::FileOffset(a[5]),
                            path,
                        },
                    });
                }
                return;
            }
            _ => {}
        }
        if ret < 0 {
            return; // a failed syscall acquires nothing
        }
        let fd = ret as i32;
        let o_cloexec = libc::O_CLOEXEC as u64;
        let mut dup_of = None;
        let cloexec = match name {
            "open" => a[1] & o_cloexec != 0,
            "openat" => a[2] & o_cloexec != 0,
            "openat2" => proc::read_u64(pid as i32, a[2]).unwrap_or(0) & o_cloexec != 0,
            "open_by_handle_at" => a[2] & o_cloexec != 0,
            "creat" => false,
            "socket" | "timerfd_create" | "eventfd2" => a[1] & o_cloexec != 0,
            "accept4" => a[3] & o_cloexec != 0,
            "socketpair" | "pipe" | "pipe2" => {
                let at = if name == "socketpair" { a[3] } else { a[0] };
                let b = proc::read_mem(pid as i32, at, 8);
                if b.len() < 8 {
                    return;
                }
                let fds = [
                    i32::from_ne_bytes(b[..4].try_into().unwrap()),
                    i32::from_ne_bytes(b[4..].try_into().unwrap()),
                ];
                // pipe2's flags and socketpair's type both carry O_CLOEXEC.
                let c = name != "pipe" && a[1] & o_cloexec != 0;
                self.acquire(tid, pid, name, fds[0], c, None, Some(a), None);
                return self.acquire_second(tid, pid, name, fds[1], c, a);
            }
            "dup" => {
                dup_of = Some(a[0] as i32);
                false
            }
            "dup2" | "dup3" => {
                // dup2(2): "If the file descriptor newfd was previously
                // open, it is closed before being reused". dup2(fd, fd)
                // changes nothing.
                if a[0] as i32 == fd {
                    return;
                }
                self.release(pid, fd);
                dup_of = Some(a[0] as i32);
                name == "dup3" && a[2] & o_cloexec != 0
            }
            "fcntl" => {
                let cmd = a[1] as i32;
                if cmd != libc::F_DUPFD && cmd != libc::F_DUPFD_CLOEXEC {
                    return;
                }
                dup_of = Some(a[0] as i32);
                cmd == libc::F_DUPFD_CLOEXEC
            }
            "signalfd" | "signalfd4" => {
                // signalfd(fd != -1, ...) updates an existing fd.
                if a[0] as i32 != -1 {
                    return;
                }
                name == "signalfd4" && a[3] & o_cloexec != 0
            }
            "epoll_create1" | "inotify_init1" | "userfaultfd" => a[0] & o_cloexec != 0,
            "memfd_create" => a[1] & 1 != 0,    // MFD_CLOEXEC
            "fanotify_init" => a[0] & 1 != 0,   // FAN_CLOEXEC
            "perf_event_open" => a[4] & 8 != 0, // PERF_FLAG_FD_CLOEXEC
            "bpf" => {
                // Only these commands return a new fd (bpf(2)).
                const FD_CMDS: &[u64] = &[0, 5, 7, 13, 14, 17, 18, 19, 28, 30, 32, 33, 36];
                if !FD_CMDS.contains(&a[0]) {
                    return;
                }
                true
            }
            "pidfd_open" | "pidfd_getfd" | "memfd_secret" => true,
            "recvmsg" | "recvmmsg" => {
                return self.received(tid, pid, name, a, ret);
            }
            _ => false,
        };
        self.acquire(tid, pid, name, fd, cloexec, dup_of, Some(a), None);
    }

    /// fds passed with SCM_RIGHTS, read back from the caller's control
    /// buffer (the kernel wrote their numbers there).
    fn received(&mut self, tid: i32, pid: u32, name: &'static str, a: [u64; 6], ret: i64) {
        let p = pid as i32;
        let (hdrs, flags): (Vec<u64>, u64) = if name == "recvmsg" {
            (vec![a[1]], a[2])
        } else {
            // struct mmsghdr: a msghdr (56 bytes) and msg_len, 64 bytes.
            (
                (0..ret.min(64) as u64).map(|i| a[1] + 64 * i).collect(),
                a[3],
            )
        };
        let cloexec = flags & libc::MSG_CMSG_CLOEXEC as u64 != 0;
        let mut fds = Vec::new();
        for h in hdrs {
            let m = proc::read_mem(p, h, 56);
            if m.len() < 56 {
                continue;
            }
            let word = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().unwrap());
            let (control, len) = (word(32), word(40).min(4096) as usize);
            let ctl = proc::read_mem(p, control, len);
            let mut off = 0usize;
            while off + 16 <= ctl.len() {
                let clen = u64::from_ne_bytes(ctl[off..off + 8].try_into().unwrap()) as usize;
                let level = i32::from_ne_bytes(ctl[off + 8..off + 12].try_into().unwrap());
                let ty = i32::from_ne_bytes(ctl[off + 12..off + 16].try_into().unwrap());
                if clen < 16 || off + clen > ctl.len() {
                    break;
                }
                if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                    for c in ctl[off + 16..off + clen].chunks_exact(4) {
                        fds.push(i32::from_ne_bytes(c.try_into().unwrap()));
                    }
                }
                off += (clen + 7) & !7;
            }
        }
        for fd in fds {
            self.acquire(tid, pid, name, fd, cloexec, None, None, None);
        }
    }

    fn acquire_second(
        &mut self,
        tid: i32,
        pid: u32,
        name: &'static str,
        fd: i32,
        c: bool,
        a: [u64; 6],
    ) {
        let detail = (name != "socketpair").then(|| "write end".to_string());
        self.acquire(tid, pid, name, fd, c, None, Some(a), detail);
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        tid: i32,
        pid: u32,
        name: &'static str,
        fd: i32,
        cloexec: bool,
        dup_of: Option<i32>,
        args: Option<[u64; 6]>,
        detail: Option<String>,
    ) {
        let time = self.now();
        let p = pid as i32;
        let (mode, inode) = proc::fd_stat(p, fd).unwrap_or((0, 0));
        let kind = FdKind::of(name, mode);
        let a = args.unwrap_or_default();
        let detail = detail.or_else(|| match name {
            "socket" => Some(format!(
                "{} {}",
                leakscope_event::socket_family(a[0]),
                leakscope_event::socket_type(a[1])
            )),
            "socketpair" => Some(format!(
                "{} {} pair",
                leakscope_event::socket_family(a[0]),
                leakscope_event::socket_type(a[1])
            )),
            "accept" | "accept4" => self.sock_addrs(pid, fd).map(|(l, r)| format!("{l} <- {r}")),
            "memfd_create" => Some(format!(
                "memfd:{}",
                proc::read_str(p, a[0]).unwrap_or_default()
            )),
            "pipe" | "pipe2" => Some("read end".into()),
            "recvmsg" | "recvmmsg" => Some("received with SCM_RIGHTS".into()),
            "open" | "creat" => proc::read_str(p, a[0]),
            "openat" | "openat2" => proc::read_str(p, a[1]),
            _ => None,
        });
        // One stack per syscall: both ends of a pipe share it.
        let stack = match self.cur_stack {
            Some(id) => id,
            None => {
                let id = self.capture(tid, pid);
                self.cur_stack = Some(id);
                id
            }
        };
        self.hold(pid, fd, stack);
        self.emit(Event::Acquire(Acquire {
            time,
            pid: Pid(pid),
            tid: Tid(tid as u32),
            fd: Fd(fd),
            kind,
            syscall: name.to_string(),
            cloexec,
            dup_of: dup_of.map(Fd),
            inode,
            detail,
            stack: StackId(stack),
        }));
    }
}

impl State {
    /// A fork or clone event of `tid`: the new task is followed from its
    /// first instruction (it stays stopped until its fork is in the stream).
    fn on_clone(&mut self, tid: i32, event: i32) {
        let mut msg: libc::c_ulong = 0;
        // SAFETY: `msg` receives the new task's id.
        unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg) };
        let new = msg as i32;
        let parent = self.tasks[&tid].pid;
        // The event says little: a clone(2) with SIGCHLD is reported as
        // a fork whatever its flags (kernel_clone()), so read them.
        let _ = event;
        let flags = self.clone_flags(tid);
        let thread = flags & libc::CLONE_THREAD as u64 != 0;
        let shares = flags & libc::CLONE_FILES as u64 != 0;
        let pid = if thread { parent } else { new as u32 };
        self.tasks.insert(new, task(pid));
        self.threads.entry(pid).or_default().insert(new);
        if !thread {
            self.new_process(pid, Some(parent), shares);
            self.emit(Event::Fork {
                time: self.now(),
                parent: Pid(parent),
                child: Pid(pid),
                shares_table: shares,
            });
        }
        if self.early.remove(&new) {
            self.resume(new, 0);
        } else {
            self.expect_stop.insert(new);
        }
    }

    /// The flags of the clone(2) or clone3(2) call `tid` is stopped in.
    fn clone_flags(&self, tid: i32) -> u64 {
        let Some(regs) = regs(tid) else {
            return 0;
        };
        match regs.orig_rax as i64 {
            // struct clone_args starts with its flags.
            libc::SYS_clone3 => proc::read_u64(tid, regs.rdi).unwrap_or(0),
            libc::SYS_clone => regs.rdi,
            // fork(2), vfork(2): a new process with a copy of the table.
            _ => 0,
        }
    }

    /// `pid` is a new process: forked from `parent` (sharing its table
    /// with CLONE_FILES), or the first one.
    fn new_process(&mut self, pid: u32, parent: Option<u32>, shares: bool) {
        let parent_table = parent.and_then(|p| self.table_of.get(&p).copied());
        let id = match (parent_table, shares) {
            (Some(t), true) => t,
            (Some(t), false) => {
                let copy = self.tables.get(&t).cloned().unwrap_or_default();
                for id in copy.fds.values() {
                    *self.refs.entry(*id).or_default() += 1;
                }
                let n = self.next_table;
                self.next_table += 1;
                self.tables.insert(n, copy);
                n
            }
            (None, _) => {
                let n = self.next_table;
                self.next_table += 1;
                self.tables.insert(n, Table::default());
                n
            }
        };
        self.table_of.insert(pid, id);
    }

    /// An exec in the process of `tid` (which ran in thread `former`):
    /// the other threads are gone, close-on-exec fds are closed, and the
    /// new program's mappings are read.
    fn exec_happened(&mut self, tid: i32, former: i32) {
        let pid = self.tasks.get(&tid).map_or(tid as u32, |t| t.pid);
        if former != tid {
            self.tasks.remove(&former);
        }
        let others: Vec<i32> = self
            .threads
            .get(&pid)
            .map(|s| s.iter().copied().filter(|t| *t != tid).collect())
            .unwrap_or_default();
        for t in others {
            self.tasks.remove(&t);
        }
        self.threads.insert(pid, HashSet::from([tid]));
        self.tasks.insert(tid, task(pid));
        self.start_stack.remove(&pid);
        let open_fds = proc::open_fds(pid as i32);
        // exec unshares the table and keeps the fds the kernel kept.
        if let Some(old) = self.table_of.get(&pid).copied() {
            let shared = self.table_of.iter().any(|(p, t)| *t == old && *p != pid);
            let mut table = self.tables.get(&old).cloned().unwrap_or_default();
            if let Some(open) = &open_fds {
                table.fds.retain(|fd, _| open.contains(&Fd(*fd)));
            }
            for id in table.fds.values() {
                *self.refs.entry(*id).or_default() += 1;
            }
            if !shared {
                if let Some(t) = self.tables.remove(&old) {
                    for id in t.fds.into_values() {
                        self.unref(id);
                    }
                }
            }
            let n = self.next_table;
            self.next_table += 1;
            self.tables.insert(n, table);
            self.table_of.insert(pid, n);
        }
        let time = self.now();
        self.emit(Event::Exec {
            time,
            pid: Pid(pid),
            path: proc::exe(pid as i32),
            open_fds,
        });
        for mapping in proc::exec_mappings(pid as i32) {
            self.emit(Event::Map {
                time,
                pid: Pid(pid),
                mapping,
            });
        }
    }

    /// A task exited (or was killed); the last of a process ends it.
    fn task_gone(&mut self, tid: i32, status: Option<i32>) {
        self.early.remove(&tid);
        self.expect_stop.remove(&tid);
        let Some(t) = self.tasks.remove(&tid) else {
            if let Some(s) = status {
                self.shared
                    .statuses
                    .lock()
                    .unwrap()
                    .entry(tid as u32)
                    .or_insert(s);
            }
            return;
        };
        let pid = t.pid;
        let threads = self.threads.entry(pid).or_default();
        threads.remove(&tid);
        if tid as u32 == pid {
            if let Some(s) = status {
                self.shared.statuses.lock().unwrap().insert(pid, s);
            }
        }
        if !threads.is_empty() {
            return;
        }
        self.threads.remove(&pid);
        // What its table still holds leaked: those stacks are kept.
        if let Some(table) = self.table_of.remove(&pid) {
            if !self.table_of.values().any(|t| *t == table) {
                self.tables.remove(&table);
            }
        }
        self.start_stack.remove(&pid);
        if let Some(fd) = self.pidfds.remove(&pid) {
            // SAFETY: our own pidfd.
            unsafe { libc::close(fd) };
        }
        self.emit(Event::Exit {
            time: self.now(),
            pid: Pid(pid),
            status,
        });
    }

    fn hold(&mut self, pid: u32, fd: i32, stack: u64) {
        let Some(t) = self.table_of.get(&pid).copied() else {
            return;
        };
        let old = self.tables.entry(t).or_default().fds.insert(fd, stack);
        *self.refs.entry(stack).or_default() += 1;
        if let Some(old) = old {
            self.unref(old);
        }
    }

    fn release(&mut self, pid: u32, fd: i32) {
        let time = self.now();
        if let Some(t) = self.table_of.get(&pid).copied() {
            if let Some(id) = self.tables.get_mut(&t).and_then(|t| t.fds.remove(&fd)) {
                self.unref(id);
            }
        }
        self.emit(Event::Release {
            time,
            pid: Pid(pid),
            fd: Fd(fd),
        });
    }

    fn release_range(&mut self, pid: u32, first: i32, last: i32) {
        let Some(t) = self.table_of.get(&pid).copied() else {
            return;
        };
        let gone: Vec<u64> = match self.tables.get_mut(&t) {
            Some(table) => {
                let fds: Vec<i32> = table
                    .fds
                    .keys()
                    .copied()
                    .filter(|fd| (first..=last).contains(fd))
                    .collect();
                fds.iter().filter_map(|fd| table.fds.remove(fd)).collect()
            }
            None => Vec::new(),
        };
        for id in gone {
            self.unref(id);
        }
    }

    fn unref(&mut self, id: u64) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
                self.shared.stacks.lock().unwrap().remove(&id);
            }
        }
    }

    /// Registers and a copy of the stack of stopped thread `tid`, from sp
    /// up to the top of its stack, kept under a new id.
    fn capture(&mut self, tid: i32, pid: u32) -> u64 {
        let id = self.next_stack;
        self.next_stack += 1;
        let raw = match regs(tid) {
            None => {
                RawStack::Missing("the registers of the stopped thread were not readable".into())
            }
            Some(r) => {
                let top = self.stack_top(tid, pid, r.rsp);
                let len = top.saturating_sub(r.rsp).min(STACK_MAX) as usize;
                let bytes = proc::read_mem(tid, r.rsp, len);
                if bytes.is_empty() {
                    RawStack::Missing("the user stack was not readable".into())
                } else {
                    RawStack::Copied {
                        ip: r.rip,
                        sp: r.rsp,
                        bp: r.rbp,
                        bytes,
                    }
                }
            }
        };
        self.shared.stacks.lock().unwrap().insert(id, raw);
        id
    }

    /// The top of the stack `sp` is in: the main thread's start of stack
    /// from /proc/PID/stat, else the end of the mapping holding `sp`.
    fn stack_top(&mut self, tid: i32, pid: u32, sp: u64) -> u64 {
        if tid as u32 == pid {
            let start = *self
                .start_stack
                .entry(pid)
                .or_insert_with(|| proc::start_stack(pid as i32).unwrap_or(0));
            if start > sp && start - sp <= STACK_MAX * 64 {
                // Up to the end of the word at startstack (argc).
                return start + 8;
            }
        }
        if let Some((lo, hi)) = self.tasks.get(&tid).and_then(|t| t.stack) {
            if (lo..hi).contains(&sp) {
                return hi;
            }
        }
        let found = proc::maps(pid as i32)
            .unwrap_or_default()
            .into_iter()
            .find(|m| (m.start..m.end).contains(&sp))
            .map(|m| (m.start, m.end));
        if let (Some(range), Some(t)) = (found, self.tasks.get_mut(&tid)) {
            t.stack = Some(range);
        }
        found.map_or(sp, |(_, hi)| hi)
    }

    fn sock_addrs(&mut self, pid: u32, fd: i32) -> Option<(String, String)> {
        let pidfd = match self.pidfds.get(&pid) {
            Some(fd) => *fd,
            None => {
                // SAFETY: pidfd_open(2) takes no memory arguments.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
                if fd < 0 {
                    return None;
                }
                self.pidfds.insert(pid, fd);
                fd
            }
        };
        proc::sock_addrs(pidfd, fd)
    }
}

fn is_stop_signal(sig: i32) -> bool {
    [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU].contains(&sig)
}

fn task(pid: u32) -> Task {
    Task {
        pid,
        pending: None,
        stack: None,
    }
}

fn regs(tid: i32) -> Option<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it.
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut r) };
    (ok == 0).then_some(r)
}
