//! Runs a command under the preload backend and prints its heap leaks,
//! grouped by allocating stack: a stand-in for `leakscope run --track heap`
//! until the CLI wires the backend in.
//!
//! ```text
//! heap_trace [--top N] [--no-symbols] -- COMMAND [ARGS...]
//! ```
//!
//! Prints `leaks: B blocks, S bytes in G stacks (A allocations, F frees,
//! C pairs settled in the shim, L lost, P processes)` (C: allocations freed
//! again on their thread before a flush, never sent) and then, unless
//! `--no-symbols`, one block per stack: `N blocks, S bytes` and its frames
//! `function (module)`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::process::{Command, ExitCode};
use std::time::Duration;

use leakscope_event::{Event, Pid, StackId, TimeNs};
use leakscope_preload::Preload;
use leakscope_stacks::{ModuleMaps, Unwinder};
use leakscope_symbolize::Symbolizer;

/// A multiply-rotate hasher for the live-block table: its keys are heap
/// addresses the traced program chose, not an attacker's, and SipHash was
/// a third of this collector's CPU on malloc-heavy programs.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut top = 10usize;
    let mut symbols = true;
    while let Some(a) = args.first().cloned() {
        match a.as_str() {
            "--top" => {
                top = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10);
                args.drain(..2);
            }
            "--no-symbols" => {
                symbols = false;
                args.remove(0);
            }
            "--" => {
                args.remove(0);
                break;
            }
            _ => break,
        }
    }
    if args.is_empty() {
        eprintln!("usage: heap_trace [--top N] [--no-symbols] -- COMMAND [ARGS...]");
        return ExitCode::from(2);
    }
    let mut backend = match Preload::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("heap_trace: {e}");
            return ExitCode::from(2);
        }
    };
    let mut child = match backend.spawn(Command::new(&args[0]).args(&args[1..])) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("heap_trace: cannot run {}: {e}", args[0]);
            return ExitCode::from(127);
        }
    };

    // (pid, addr) -> (size, stack, time)
    let mut live: HashMap<(Pid, u64), (u64, StackId, TimeNs), BuildHasherDefault<Fx>> =
        HashMap::default();
    let mut leaked: Vec<(Pid, u64, StackId, TimeNs)> = Vec::new();
    let mut maps = ModuleMaps::new();
    let (mut allocs, mut frees, mut lost) = (0u64, 0u64, 0u64);
    let mut pids = std::collections::HashSet::new();
    let mut last_pid = None;
    let mut status = None;
    loop {
        // Once every image hung up, the child is about to be reaped: look
        // again soon rather than sleep out a long poll.
        let wait = if backend.has_connections() { 50 } else { 2 };
        let r = backend.poll(Duration::from_millis(wait), &mut |e| {
            if !matches!(e, Event::Alloc { .. } | Event::Free { .. }) {
                maps.apply(&e);
            }
            match e {
                Event::Alloc {
                    pid,
                    addr,
                    size,
                    stack,
                    time,
                    ..
                } => {
                    allocs += 1;
                    if last_pid != Some(pid) {
                        pids.insert(pid);
                        last_pid = Some(pid);
                    }
                    live.insert((pid, addr.0), (size, stack, time));
                }
                Event::Free { pid, addr, .. } => {
                    frees += 1;
                    live.remove(&(pid, addr.0));
                }
                Event::HeapEnd { pid, .. } => {
                    let gone: Vec<_> = live.keys().filter(|k| k.0 == pid).copied().collect();
                    for k in gone {
                        let (size, stack, time) = live.remove(&k).expect("listed");
                        leaked.push((pid, size, stack, time));
                    }
                }
                Event::Lost { count, .. } => lost += count,
                _ => {}
            }
        });
        if let Err(e) = r {
            eprintln!("heap_trace: {e}");
            return ExitCode::from(2);
        }
        if status.is_none() {
            status = child.try_wait().ok().flatten();
        }
        if status.is_some() && !backend.has_connections() {
            break;
        }
    }

    // Already reaped by try_wait; wait() returns the same status.
    let _ = child.wait();

    let mut groups: HashMap<StackId, (u64, u64, Pid, TimeNs)> = HashMap::new();
    for (pid, size, stack, time) in &leaked {
        let g = groups.entry(*stack).or_insert((0, 0, *pid, *time));
        g.0 += 1;
        g.1 += size;
    }
    let bytes: u64 = leaked.iter().map(|l| l.1).sum();
    println!(
        "leaks: {} blocks, {} bytes in {} stacks ({} allocations, {} frees, \
         {} pairs settled in the shim, {} lost, {} processes)",
        leaked.len(),
        bytes,
        groups.len(),
        allocs,
        frees,
        backend.settled(),
        lost,
        pids.len()
    );
    if symbols {
        let mut order: Vec<_> = groups.into_iter().collect();
        order.sort_by_key(|(id, g)| (std::cmp::Reverse(g.1), id.0));
        let mut unwinder = Unwinder::new();
        let mut symbolizer = Symbolizer::new();
        for (id, (n, b, pid, time)) in order.into_iter().take(top) {
            println!("\n{n} blocks, {b} bytes (pid {pid})");
            let raw = backend.raw_stack(id);
            if std::env::var_os("HEAP_TRACE_RAW").is_some() {
                println!("  raw {raw:x?}");
            }
            let unwound = unwinder.unwind(&maps, pid, time, &raw);
            for f in symbolizer.symbolize(&unwound.frames).iter().take(12) {
                let module = f.module.as_deref().unwrap_or("?");
                let module = module.rsplit('/').next().unwrap_or(module);
                println!("  {} ({module})", f.function.as_deref().unwrap_or("??"));
            }
            if let Some(note) = unwound.truncated {
                println!("  (stack {note})");
            }
        }
    }
    ExitCode::SUCCESS
}
