//! Choosing backends for what is tracked, and running several on one
//! launch: eBPF for fds, the preload shim for the heap.

use std::io;
use std::process::{Child, Command};
use std::time::Duration;

use leakscope_event::{Backend, Event, RawStack, StackId};

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
}

/// Stack ids of the heap backend carry this bit so they never collide
/// with the fd backend's.
const HEAP_BIT: u64 = 1 << 63;

/// One launch traced by an fd backend and/or a heap backend.
pub struct Combined {
    fd: Option<Box<dyn Backend>>,
    heap: Option<Box<dyn Backend>>,
    name: &'static str,
    /// What was left out, and why.
    notes: Vec<String>,
}

/// Opens the backends `tracking` needs under `choice`, or says in one line
/// why it cannot and what would work instead. With `defaults` (the user
/// named no kinds), a backend named by `choice` keeps only what it can
/// track, and fds are dropped with a note when eBPF cannot be used.
pub fn open(
    mut tracking: Tracking,
    choice: Choice,
    mode: Mode,
    allocator: Option<String>,
    defaults: bool,
) -> anyhow::Result<Combined> {
    let mut notes = Vec::new();
    if defaults {
        match choice {
            Choice::Preload => tracking.fd = false,
            Choice::Ebpf if mode == Mode::Launch => tracking.heap = false,
            _ => {}
        }
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
    let fd: Option<Box<dyn Backend>> = if tracking.needs_fd_backend() {
        match leakscope_ebpf::Tracer::new(leakscope_ebpf::Config { tcp: tracking.tcp }) {
            Ok(t) => Some(Box::new(t)),
            Err(e) if defaults && tracking.heap && !tracking.tcp => {
                notes.push(format!(
                    "fds were not traced: {e}. The heap was; --track heap says \
                     that is all you want"
                ));
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
    } else {
        None
    };
    let heap: Option<Box<dyn Backend>> = match (tracking.heap, mode) {
        (false, _) => None,
        (true, Mode::Launch) => match leakscope_preload::Preload::new() {
            Ok(p) => Some(Box::new(p)),
            Err(e) if defaults && fd.is_some() => {
                notes.push(format!("the heap was not traced: {e}"));
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
    let name = match (&fd, &heap, mode) {
        (Some(_), Some(_), Mode::Launch) => "ebpf+preload",
        (Some(_), None, _) | (_, Some(_), Mode::Attach { .. }) => "ebpf",
        (None, Some(_), Mode::Launch) => "preload",
        (None, None, _) => return Err(fatal(exit::ERROR, "nothing to track".into())),
    };
    Ok(Combined {
        fd,
        heap,
        name,
        notes,
    })
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
        (Mode::Attach { .. }, None) => "without eBPF only the heap of a command leakscope \
                                        launches can be traced: leakscope run --backend \
                                        preload --track heap -- COMMAND"
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
        match &mut self.fd {
            Some(f) => f.spawn(cmd),
            None => cmd.spawn(),
        }
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
        let mut notes = self.notes.clone();
        for b in [&self.fd, &self.heap].into_iter().flatten() {
            notes.extend(b.notes());
        }
        notes
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut heap_timeout = timeout;
        if let Some(f) = &mut self.fd {
            f.poll(timeout, sink)?;
            heap_timeout = Duration::ZERO;
        }
        let both = self.fd.is_some();
        // Put heap events on the fd backend's clock.
        let shift = match (&self.fd, &self.heap) {
            (Some(f), Some(h)) => h.time_base() as i64 - f.time_base() as i64,
            _ => 0,
        };
        if let Some(h) = &mut self.heap {
            h.poll(heap_timeout, &mut |mut ev| {
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
