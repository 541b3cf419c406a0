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
}

/// Opens the backends `tracking` needs under `choice`, or says in one line
/// why it cannot and what would work instead.
pub fn open(tracking: Tracking, choice: Choice) -> anyhow::Result<Combined> {
    if tracking.heap && choice == Choice::Ebpf {
        return Err(fatal(
            exit::ERROR,
            "heap tracking with eBPF uprobes is not available yet; use --backend \
             preload (or auto) for the heap"
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
        match leakscope_ebpf::Tracer::new(Default::default()) {
            Ok(t) => Some(Box::new(t)),
            Err(e) => {
                let hint = if tracking.heap {
                    ""
                } else {
                    " (without privileges, heap leaks can still be traced: --track heap)"
                };
                return Err(fatal(exit::ERROR, format!("{e}{hint}")));
            }
        }
    } else {
        None
    };
    let heap: Option<Box<dyn Backend>> = if tracking.heap {
        match leakscope_preload::Preload::new() {
            Ok(p) => Some(Box::new(p)),
            Err(e) => return Err(fatal(exit::ERROR, format!("preload backend: {e}"))),
        }
    } else {
        None
    };
    let name = match (&fd, &heap) {
        (Some(_), Some(_)) => "ebpf+preload",
        (Some(_), None) => "ebpf",
        (None, Some(_)) => "preload",
        (None, None) => return Err(fatal(exit::ERROR, "nothing to track".into())),
    };
    Ok(Combined { fd, heap, name })
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
        if self.heap.is_some() {
            return Err(io::Error::other(
                "heap tracking of a running process (eBPF uprobes) is not available yet; \
                 attach tracks fds and TCP states",
            ));
        }
        match &mut self.fd {
            Some(f) => f.attach(pid),
            None => Err(io::Error::other("nothing to attach with")),
        }
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
}
