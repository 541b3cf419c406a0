//! Choosing backends for what is tracked, and running several on one
//! launch: eBPF (or ptrace, without it) for fds, the preload shim for the
//! heap.

use std::io;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use leakscope_event::{Backend, Event, Pid, RawStack, StackId};
use leakscope_report::{Coverage, Traced};

use crate::exit;
use crate::pipeline::fatal;

/// What to track.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracking {
    pub fd: bool,
    pub heap: bool,
    /// Sockets left in CLOSE_WAIT (needs the fd backend underneath).
    pub tcp: bool,
}

impl Tracking {
    fn needs_fd_backend(self) -> bool {
        self.fd || self.tcp
    }
}

/// Launching a command, or attaching to a running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Launch,
    /// With the heap backend's settings.
    Attach {
        sample_every: u32,
    },
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Ebpf,
    Preload,
    /// seccomp-filtered ptrace for fds (no privileges).
    Ptrace,
}

/// Stack ids of the heap backend carry this bit so they never collide
/// with the fd backend's.
const HEAP_BIT: u64 = 1 << 63;

/// One launch traced by an fd backend and/or a heap backend.
pub struct Combined {
    fd: Option<Box<dyn Backend>>,
    heap: Option<Box<dyn Backend>>,
    name: &'static str,
    mode: Mode,
    /// What the user asked for (`--track`, or the defaults).
    asked: Tracking,
    /// What is traced: `asked` less what `--backend` cannot track.
    tracking: Tracking,
    /// Kinds asked for whose backend could not be opened, and why.
    dropped_fd: Option<String>,
    dropped_heap: Option<String>,
    /// The heap backend sent something: the shim is in some process.
    heap_seen: bool,
    /// Processes that cannot load the shim (statically linked), with
    /// their program; seen at launch or, with eBPF, at each exec.
    no_shim: Vec<(Pid, String)>,
    /// The program launched, for the reason nothing loaded the shim.
    launched: Option<std::path::PathBuf>,
    /// The fd backend is ptrace: it alone may wait for the command.
    reaped: Option<leakscope_ptrace::Reaped>,
    /// Why fds are traced with ptrace rather than eBPF (`--backend auto`):
    /// the note, and eBPF's error alone.
    fallback: Option<String>,
    ebpf_refused: Option<String>,
}

/// Opens the backends `tracking` needs under `choice`, or says in one line
/// why it cannot and what would work instead. With `defaults` (the user
/// named no kinds), a backend named by `choice` keeps only what it can
/// track, and fds are dropped when eBPF cannot be used; the report says
/// so ([`Combined::coverage`]).
pub fn open(
    mut tracking: Tracking,
    choice: Choice,
    mode: Mode,
    allocator: Option<String>,
    defaults: bool,
) -> anyhow::Result<Combined> {
    let asked = tracking;
    let mut dropped_fd = None;
    let mut dropped_heap = None;
    if defaults {
        match choice {
            Choice::Preload => tracking.fd = false,
            Choice::Ebpf | Choice::Ptrace if mode == Mode::Launch => tracking.heap = false,
            _ => {}
        }
    }
    if tracking.tcp && choice == Choice::Ptrace {
        return Err(fatal(
            exit::ERROR,
            "the ptrace backend traces fds, not TCP states (those need eBPF: \
             --backend ebpf, as root)"
                .into(),
        ));
    }
    if tracking.heap && mode == Mode::Launch && choice == Choice::Ebpf {
        return Err(fatal(
            exit::ERROR,
            "heap tracking of a launched command uses the preload shim (eBPF \
             uprobes cost microseconds per call): use --backend preload or auto"
                .into(),
        ));
    }
    if tracking.needs_fd_backend() && choice == Choice::Preload {
        return Err(fatal(
            exit::ERROR,
            "the preload backend tracks the heap only (glibc opens fds internally \
             where no preload hook sees them); track fds and TCP states with \
             --backend ebpf (root)"
                .into(),
        ));
    }
    let mut reaped = None;
    let mut fallback = None;
    let mut ebpf_refused = None;
    // The defaults with eBPF: leaked sockets also say their last TCP state
    // (a CLOSE_WAIT socket is its own `tcp` group). Only eBPF sees TCP
    // states: without it the defaults do not include them.
    let tcp_default = defaults && tracking.fd && !tracking.tcp && choice != Choice::Ptrace;
    let fd: Option<Box<dyn Backend>> = if !tracking.needs_fd_backend() {
        None
    } else if choice == Choice::Ptrace {
        let t = open_ptrace(mode)?;
        reaped = Some(t.reaped());
        Some(Box::new(t))
    } else {
        let open = |tcp| leakscope_ebpf::Tracer::new(leakscope_ebpf::Config { tcp });
        // The TCP program failing alone must not cost the defaults their fds.
        let (opened, tcp) = match open(tracking.tcp || tcp_default) {
            Err(_) if tcp_default => (open(false), false),
            r => (r, tracking.tcp || tcp_default),
        };
        match opened {
            Ok(t) => {
                tracking.tcp = tcp;
                Some(Box::new(t))
            }
            // --backend auto: without eBPF, fds are traced with ptrace,
            // and the report's first lines say why (issue 13).
            Err(e) if choice == Choice::Auto && !tracking.tcp => match leakscope_ptrace::check() {
                Ok(()) => {
                    let t = open_ptrace(mode)?;
                    reaped = Some(t.reaped());
                    fallback = Some(format!(
                        "fds traced with ptrace: eBPF could not be used: {e}"
                    ));
                    ebpf_refused = Some(e.to_string());
                    Some(Box::new(t))
                }
                Err(p) => {
                    let why = nothing_traces_fds(&e, &p);
                    if defaults && tracking.heap {
                        // Not asked for by name: the heap alone is traced,
                        // and the report says why fds were not.
                        dropped_fd = Some(why);
                        None
                    } else {
                        return Err(fatal(exit::ERROR, why));
                    }
                }
            },
            Err(e) if defaults && tracking.heap && !tracking.tcp => {
                // Not asked for by name: the heap alone is traced, and
                // the report says this (`--track heap` asks for no more).
                dropped_fd = Some(format!("{e} (--track heap: the heap alone)"));
                None
            }
            Err(e) => {
                let rejected = matches!(
                    e,
                    leakscope_ebpf::Error::Load(leakscope_bpf::LoadError::Verifier { .. })
                );
                let hint = instead(mode, rejected.then_some("--track heap"));
                return Err(fatal(exit::ERROR, format!("{e}; {hint}")));
            }
        }
    };
    let heap: Option<Box<dyn Backend>> = match (tracking.heap, mode) {
        (false, _) => None,
        (true, Mode::Launch) => match leakscope_preload::Preload::new() {
            Ok(p) => Some(Box::new(p)),
            Err(e) if defaults && fd.is_some() => {
                dropped_heap = Some(e.to_string());
                None
            }
            Err(e) => return Err(fatal(exit::ERROR, format!("preload backend: {e}"))),
        },
        // A running process: allocator uprobes (the shim can only be
        // preloaded at launch).
        (true, Mode::Attach { sample_every }) => {
            let config = leakscope_uheap::Config {
                allocator_prefix: allocator,
                sample_every,
            };
            match leakscope_uheap::HeapTracer::new(config) {
                Ok(h) => Some(Box::new(h)),
                Err(e) => {
                    let rejected = matches!(
                        e,
                        leakscope_uheap::Error::Load(leakscope_bpf::LoadError::Verifier { .. })
                    );
                    let hint = instead(mode, rejected.then_some("--track fd"));
                    return Err(fatal(exit::ERROR, format!("{e}; {hint}")));
                }
            }
        }
    };
    let ptrace = reaped.is_some();
    let name = match (&fd, &heap, mode) {
        (Some(_), Some(_), Mode::Launch) if ptrace => "ptrace+preload",
        (Some(_), Some(_), Mode::Attach { .. }) if ptrace => "ptrace+ebpf",
        (Some(_), None, _) if ptrace => "ptrace",
        (Some(_), Some(_), Mode::Launch) => "ebpf+preload",
        (Some(_), None, _) | (_, Some(_), Mode::Attach { .. }) => "ebpf",
        (None, Some(_), Mode::Launch) => "preload",
        (None, None, _) => return Err(fatal(exit::ERROR, "nothing to track".into())),
    };
    let asked = Tracking {
        tcp: asked.tcp || (tcp_default && tracking.tcp),
        ..asked
    };
    Ok(Combined {
        fd,
        heap,
        name,
        mode,
        asked,
        tracking,
        dropped_fd,
        dropped_heap,
        heap_seen: false,
        no_shim: Vec::new(),
        launched: None,
        reaped,
        fallback,
        ebpf_refused,
    })
}

/// The ptrace backend, or why it cannot be used (one sentence saying what
/// to change).
fn open_ptrace(mode: Mode) -> anyhow::Result<leakscope_ptrace::Tracer> {
    let _ = mode;
    leakscope_ptrace::Tracer::new(leakscope_ptrace::Config::default()).map_err(|e| {
        fatal(
            exit::ERROR,
            format!("{e}; --backend ebpf traces fds as root without ptrace"),
        )
    })
}

/// The one sentence `run` and `attach` end with when neither fd backend
/// can be used here: both reasons, and what to change (issue 13).
fn nothing_traces_fds(ebpf: &leakscope_ebpf::Error, ptrace: &leakscope_ptrace::Error) -> String {
    let leakscope_ptrace::Error::NotPermitted { reason } = ptrace else {
        return format!(
            "nothing can trace fds here: eBPF could not be used ({ebpf}), nor ptrace ({ptrace})"
        );
    };
    let root = matches!(
        ebpf,
        leakscope_ebpf::Error::Load(leakscope_bpf::LoadError::Permission { .. })
    )
    .then_some(", or run leakscope as root (eBPF)")
    .unwrap_or("");
    format!("nothing can trace fds here: eBPF could not be used ({ebpf}), and {reason}{root}")
}

/// Whether the ELF file at `path` is statically linked: it has no
/// PT_INTERP program header, so no dynamic loader runs in it and nothing
/// reads LD_PRELOAD (ld.so(8)); static-pie executables included. `None`
/// when it cannot be read or is not ELF (a `#!` script: its interpreter's
/// exec is seen on its own).
pub fn statically_linked(path: &Path) -> Option<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h).ok()?;
    if h[..4] != *b"\x7fELF" {
        return None;
    }
    let le = match h[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let u16_at = |b: &[u8], o: usize| {
        let v = [b[o], b[o + 1]];
        if le {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }
    };
    let u32_at = |b: &[u8], o: usize| {
        let v = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    // e_phoff, e_phentsize, e_phnum (elf(5)) for ELFCLASS32 and 64.
    let (phoff, phentsize, phnum) = match h[4] {
        1 => (u32_at(&h, 0x1c) as u64, u16_at(&h, 0x2a), u16_at(&h, 0x2c)),
        2 => {
            let lo = u32_at(&h, 0x20) as u64;
            let hi = u32_at(&h, 0x24) as u64;
            let off = if le { hi << 32 | lo } else { lo << 32 | hi };
            (off, u16_at(&h, 0x36), u16_at(&h, 0x38))
        }
        _ => return None,
    };
    if phentsize < 4 || phnum == 0 {
        return Some(true);
    }
    let mut ph = vec![0u8; phentsize as usize * phnum as usize];
    f.seek(SeekFrom::Start(phoff)).ok()?;
    f.read_exact(&mut ph).ok()?;
    Some(
        !ph.chunks_exact(phentsize as usize)
            .any(|p| u32_at(p, 0) == PT_INTERP),
    )
}

/// Why the loader would ignore LD_PRELOAD in `path` for us: a set-user-ID
/// or set-group-ID program of another user or group runs in secure mode
/// (ld.so(8)).
fn secure_mode(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    // SAFETY: geteuid(2) and getegid(2) cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if m.mode() & libc::S_ISUID != 0 && m.uid() != euid {
        Some("set-user-ID")
    } else if m.mode() & libc::S_ISGID != 0 && m.gid() != egid {
        Some("set-group-ID")
    } else {
        None
    }
}

impl Combined {
    /// Why eBPF could not be used, when `--backend auto` fell back to
    /// ptrace for fds.
    pub fn ebpf_refused(&self) -> Option<&str> {
        self.ebpf_refused.as_deref()
    }

    /// The command's exit status once it has exited: the ptrace backend
    /// reaps it itself (a waitpid of ours would take its ptrace stops).
    pub fn try_wait(&mut self, child: &mut Child) -> io::Result<Option<std::process::ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        match &self.reaped {
            Some(r) => Ok(r
                .status(Pid(child.id()))
                .map(std::process::ExitStatus::from_raw)),
            None => child.try_wait(),
        }
    }

    /// What is traced (the defaults include TCP states when eBPF loaded).
    pub fn tracking(&self) -> Tracking {
        self.tracking
    }

    /// What was traced and what was not, per kind, and why (see
    /// [`Coverage`]). Final once the trace has ended.
    pub fn coverage(&self) -> Vec<Coverage> {
        let kinds = [
            ("fd", self.asked.fd, self.tracking.fd),
            ("heap", self.asked.heap, self.tracking.heap),
            ("tcp", self.asked.tcp, self.tracking.tcp),
        ];
        kinds
            .into_iter()
            .map(|(kind, asked, tracking)| {
                let none = |requested: bool, reason: String| Coverage {
                    kind: kind.into(),
                    requested,
                    traced: Traced::None,
                    reason: Some(reason),
                };
                if !tracking {
                    let why = match (kind, asked) {
                        ("fd", true) => "--backend preload traces the heap only".into(),
                        ("heap", true) => "--backend ebpf does not trace the heap of a \
                                           launched command (the preload shim does: \
                                           --backend auto)"
                            .into(),
                        ("tcp", false) if self.fallback.is_some() => {
                            "TCP states need eBPF, which could not be used".into()
                        }
                        _ => format!("not asked for (--track {kind})"),
                    };
                    return none(false, why);
                }
                let dropped = match kind {
                    "fd" => &self.dropped_fd,
                    "heap" => &self.dropped_heap,
                    _ => &None,
                };
                if let Some(why) = dropped {
                    return none(true, why.clone());
                }
                if kind == "heap" && self.mode == Mode::Launch {
                    return self.heap_coverage();
                }
                Coverage::all(kind)
            })
            .collect()
    }

    /// The preload shim's coverage of a launch: none when no process
    /// loaded it, part when some could not (statically linked).
    fn heap_coverage(&self) -> Coverage {
        let mut c = Coverage::all("heap");
        let list = |n: usize| -> String {
            let mut s: Vec<String> = self
                .no_shim
                .iter()
                .take(n)
                .map(|(pid, path)| format!("`{path}` (pid {})", pid.0))
                .collect();
            if self.no_shim.len() > n {
                s.push(format!("and {} more", self.no_shim.len() - n));
            }
            s.join(", ")
        };
        let statics = match self.no_shim.len() {
            0 => None,
            1 => Some(format!(
                "{} is statically linked and ignores LD_PRELOAD",
                list(1)
            )),
            n => Some(format!(
                "{n} statically linked programs ignore LD_PRELOAD: {}",
                list(3)
            )),
        };
        if !self.heap_seen {
            c.traced = Traced::None;
            let launched = self.launched.as_deref();
            c.reason = Some(match (statics, launched.and_then(secure_mode)) {
                (Some(s), _) => s,
                (None, Some(what)) => format!(
                    "`{}` is {what}: the loader ignores LD_PRELOAD for it",
                    launched
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                (None, None) => "no process loaded the shim (statically linked and \
                                 setuid programs ignore LD_PRELOAD)"
                    .into(),
            });
        } else if let Some(s) = statics {
            c.traced = Traced::Part;
            c.reason = Some(s);
        }
        c
    }

    /// Notes a process that cannot load the shim, once: the launch and
    /// the kernel's exec event name the same program differently
    /// (`./prog`, `/home/me/prog`), so they are compared as real paths.
    fn note_static(no_shim: &mut Vec<(Pid, String)>, pid: Pid, path: &Path) {
        if statically_linked(path) != Some(true) {
            return;
        }
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let same = real(path);
        if !no_shim
            .iter()
            .any(|(p, s)| *p == pid && real(Path::new(s)) == same)
        {
            no_shim.push((pid, path.display().to_string()));
        }
    }
}

/// What still works when an eBPF backend cannot be used, for the end of
/// its error: the preload shim needs neither privileges nor eBPF; when the
/// verifier rejected one program, `other` names the option whose programs
/// it did not look at.
fn instead(mode: Mode, other: Option<&str>) -> String {
    match (mode, other) {
        (Mode::Launch, _) => {
            "without eBPF the heap can still be traced: --backend preload --track heap".into()
        }
        (Mode::Attach { .. }, Some(other)) => {
            format!("{other} uses other eBPF programs (`leakscope doctor` shows which work here)")
        }
        (Mode::Attach { .. }, None) => "without eBPF, fds of a running process can still \
                                        be traced with ptrace (--backend ptrace --track fd), \
                                        the heap of a command leakscope launches with the \
                                        preload shim (leakscope run --backend preload \
                                        --track heap -- COMMAND)"
            .into(),
    }
}

impl Backend for Combined {
    fn name(&self) -> &'static str {
        self.name
    }

    fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        if let Some(h) = &mut self.heap {
            h.prepare(cmd);
        }
        let child = match &mut self.fd {
            Some(f) => f.spawn(cmd),
            None => cmd.spawn(),
        }?;
        if self.heap.is_some() {
            let prog = Path::new(cmd.get_program());
            Self::note_static(&mut self.no_shim, Pid(child.id()), prog);
            self.launched = Some(prog.to_path_buf());
        }
        Ok(child)
    }

    fn attach(&mut self, pid: leakscope_event::Pid) -> io::Result<()> {
        if let Some(f) = &mut self.fd {
            f.attach(pid)?;
        }
        if let Some(h) = &mut self.heap {
            h.attach(pid)?;
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = self.fallback.iter().cloned().collect();
        for b in [&self.fd, &self.heap].into_iter().flatten() {
            notes.extend(b.notes());
        }
        // What was not traced is said by the coverage, with a reason.
        notes.retain(|n| !n.starts_with("the heap was not traced"));
        notes
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut heap_timeout = timeout;
        let watch_execs = self.heap.is_some() && self.mode == Mode::Launch;
        if let Some(f) = &mut self.fd {
            let no_shim = &mut self.no_shim;
            f.poll(timeout, &mut |ev| {
                // An exec into a static program leaves the shim behind.
                if let (true, Event::Exec { pid, path, .. }) = (watch_execs, &ev) {
                    let exe = match Path::new(path) {
                        p if p.is_absolute() => p.to_path_buf(),
                        _ => std::path::PathBuf::from(format!("/proc/{}/exe", pid.0)),
                    };
                    Self::note_static(no_shim, *pid, &exe);
                }
                sink(ev)
            })?;
            heap_timeout = Duration::ZERO;
        }
        let both = self.fd.is_some();
        // Put heap events on the fd backend's clock.
        let shift = match (&self.fd, &self.heap) {
            (Some(f), Some(h)) => h.time_base() as i64 - f.time_base() as i64,
            _ => 0,
        };
        if let Some(h) = &mut self.heap {
            let seen = &mut self.heap_seen;
            h.poll(heap_timeout, &mut |mut ev| {
                *seen = true;
                let t = ev.time_mut();
                *t = leakscope_event::TimeNs(t.0.saturating_add_signed(shift));
                match ev {
                    // With eBPF present, process lifetimes come from the kernel.
                    Event::Fork { .. } | Event::Exec { .. } | Event::Exit { .. } if both => {}
                    Event::Alloc {
                        time,
                        pid,
                        tid,
                        addr,
                        size,
                        stack,
                    } => sink(Event::Alloc {
                        time,
                        pid,
                        tid,
                        addr,
                        size,
                        stack: StackId(stack.0 | HEAP_BIT),
                    }),
                    other => sink(other),
                }
            })?;
        }
        Ok(())
    }

    fn kept_by_runtime(
        &self,
        pid: leakscope_event::Pid,
        addr: leakscope_event::AbsAddr,
    ) -> Option<&'static str> {
        self.heap.as_ref()?.kept_by_runtime(pid, addr)
    }

    fn raw_stack(&mut self, id: StackId) -> RawStack {
        let backend = if id.0 & HEAP_BIT != 0 {
            &mut self.heap
        } else {
            &mut self.fd
        };
        match backend {
            Some(b) => b.raw_stack(StackId(id.0 & !HEAP_BIT)),
            None => RawStack::Missing("no backend for this stack".into()),
        }
    }

    fn retain_stack(&mut self, id: StackId) {
        if id.0 & HEAP_BIT == 0 {
            if let Some(f) = &mut self.fd {
                f.retain_stack(id);
            }
        }
    }

    fn forget_process(&mut self, pid: leakscope_event::Pid, fds: &[leakscope_event::Fd]) {
        if let Some(f) = &mut self.fd {
            f.forget_process(pid, fds);
        }
    }

    fn settle(&mut self) {
        if let Some(f) = &mut self.fd {
            f.settle();
        }
    }

    fn stop(&mut self) {
        for b in [&mut self.fd, &mut self.heap].into_iter().flatten() {
            b.stop();
        }
    }

    fn settled(&self) -> u64 {
        [&self.fd, &self.heap]
            .into_iter()
            .flatten()
            .map(|b| b.settled())
            .sum()
    }
}
