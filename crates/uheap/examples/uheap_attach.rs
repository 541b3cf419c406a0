//! Attach the eBPF heap backend to a running process until it exits, then
//! print its leaked blocks grouped by the first frame outside libc.
//!
//! Usage: uheap_attach PID [--sample N] [--prefix P] [--events]
//!
//! Prints `attached` on stderr once the probes are in place (scripts wait
//! for it before letting the workload start).
use std::collections::HashMap;
use std::time::Duration;

use leakscope_event::{Backend, Event, Pid};
use leakscope_ledger::{Ledger, Resource};
use leakscope_stacks::{ModuleMaps, Unwinder};
use leakscope_symbolize::Symbolizer;
use leakscope_uheap::{Config, HeapTracer};

fn main() {
    let mut args = std::env::args().skip(1);
    let pid = Pid(args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: uheap_attach PID [--sample N] [--prefix P] [--events]"));
    let mut config = Config::default();
    let mut show_events = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sample" => {
                config.sample_every = args.next().and_then(|n| n.parse().ok()).expect("N")
            }
            "--prefix" => config.allocator_prefix = args.next(),
            "--events" => show_events = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let mut tracer = HeapTracer::new(config).unwrap_or_else(|e| {
        eprintln!("uheap_attach: {e}");
        std::process::exit(2)
    });
    if let Err(e) = tracer.attach(pid) {
        eprintln!("uheap_attach: {e}");
        std::process::exit(2);
    }
    eprintln!(
        "attached to pid {pid}: {} in {}",
        tracer.probed_functions(pid).join(", "),
        tracer.allocator(pid).unwrap_or("?")
    );
    let mut ledger = Ledger::default();
    let mut maps = ModuleMaps::new();
    let (mut allocs, mut frees) = (0u64, 0u64);
    let mut exited = false;
    while !exited {
        tracer
            .poll(Duration::from_millis(50), &mut |e| {
                if show_events {
                    eprintln!("{e:?}");
                }
                match &e {
                    Event::Alloc { .. } => allocs += 1,
                    Event::Free { .. } => frees += 1,
                    Event::Exit { pid: p, .. } if *p == pid => exited = true,
                    _ => {}
                }
                maps.apply(&e);
                ledger.apply(&e);
            })
            .expect("poll");
        // SAFETY: kill(2) with signal 0 only checks that the pid exists.
        if !exited && unsafe { libc::kill(pid.0 as i32, 0) } != 0 {
            exited = true;
        }
    }
    let lost = ledger.lost();
    let mut unwinder = Unwinder::new();
    let mut symbolizer = Symbolizer::new();
    let mut groups: HashMap<String, (u64, u64)> = HashMap::new();
    for leak in ledger.finish() {
        let Resource::Heap(b) = &leak.resource else {
            continue;
        };
        let raw = tracer.raw_stack(b.stack);
        let unwound = unwinder.unwind(&maps, b.pid, b.time, &raw);
        let frames = symbolizer.symbolize(&unwound.frames);
        let key = frames
            .iter()
            .find(|f| !f.inlined && !f.module.as_deref().unwrap_or("").contains("libc.so"))
            .and_then(|f| f.function.clone())
            .unwrap_or_else(|| "?".into());
        let g = groups.entry(key).or_default();
        g.0 += 1;
        g.1 += b.size;
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1 .0));
    for (f, (n, bytes)) in &groups {
        println!("{n} blocks ({bytes} bytes) leaked from {f}");
    }
    println!("{allocs} allocs, {frees} frees, {lost} lost");
    for n in tracer.notes() {
        println!("note: {n}");
    }
}
