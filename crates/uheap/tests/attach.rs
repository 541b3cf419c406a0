//! End-to-end: attach the eBPF heap backend to a running C fixture
//! (`fixtures/uheap/uheap_target.c`), feed its events to the ledger, take a
//! snapshot while the process still runs, unwind and symbolize the leaked
//! blocks' stacks, and check exact counts and bytes per function.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use leakscope_event::{Backend, Event, Pid};
use leakscope_ledger::{Ledger, Resource};
use leakscope_stacks::{ModuleMaps, Unwinder};
use leakscope_symbolize::Symbolizer;
use leakscope_uheap::{Config, HeapTracer};

/// The fixture functions a leak is attributed to (innermost first wins).
const LEAKERS: [&str; 5] = [
    "wrapper1",
    "grow_buffer",
    "aligned_leak",
    "zeroed_leak",
    "child_leak",
];

/// Compiles the fixture with `flags`, once per test process. Tests run in
/// parallel: the binary is written under a temporary name and renamed, so
/// no test ever executes a file being written (ETXTBSY).
fn build(flags: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("uheap_target{}", flags.concat().replace(['-', '='], "_"));
    if let Some(p) = built.get(&name) {
        return p.clone();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("uheap-fixtures");
    std::fs::create_dir_all(&dir).expect("fixture dir");
    let out = dir.join(&name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/uheap/uheap_target.c");
    let st = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=gnu11", "-g", "-O2", "-Wall", "-Wextra"])
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .status()
        .expect("run the C compiler");
    assert!(st.success(), "compiling {} failed", src.display());
    std::fs::rename(&tmp, &out).expect("rename the fixture into place");
    built.insert(name, out.clone());
    out
}

/// One leaked block: holder, size, symbolized function names innermost first.
#[derive(Debug)]
struct Leak {
    pid: Pid,
    size: u64,
    functions: Vec<String>,
}

struct Outcome {
    pid: Pid,
    leaks: Vec<Leak>,
    allocs: u64,
    frees: u64,
    lost: u64,
    notes: Vec<String>,
}

impl Outcome {
    /// (blocks, bytes) per attributed function, and the unattributed ones.
    fn by_function(&self) -> BTreeMap<String, (usize, u64)> {
        let mut m = BTreeMap::new();
        for l in &self.leaks {
            let f = l
                .functions
                .iter()
                .find(|f| LEAKERS.contains(&f.as_str()))
                .cloned()
                .unwrap_or_else(|| format!("unattributed {:?}", l.functions));
            let e = m.entry(f).or_insert((0, 0));
            e.0 += 1;
            e.1 += l.size;
        }
        m
    }
}

fn run(bin: &Path, args: &[&str], config: Config) -> Outcome {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fixture");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid: u32 = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fixture prints its pid")
        .trim()
        .parse()
        .expect("a pid");
    let pid = Pid(pid);
    let mut tracer = HeapTracer::new(config).expect("load the heap tracer");
    tracer.attach(pid).expect("attach");
    let mut ledger = Ledger::default();
    let mut maps = ModuleMaps::new();
    let (mut allocs, mut frees) = (0, 0);
    let mut feed = |tracer: &mut HeapTracer, ledger: &mut Ledger, maps: &mut ModuleMaps| {
        tracer
            .poll(Duration::from_millis(20), &mut |e| {
                match &e {
                    Event::Alloc { .. } => allocs += 1,
                    Event::Free { .. } => frees += 1,
                    _ => {}
                }
                maps.apply(&e);
                ledger.apply(&e);
            })
            .expect("poll");
    };
    feed(&mut tracer, &mut ledger, &mut maps);
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("write go");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        feed(&mut tracer, &mut ledger, &mut maps);
        if let Ok(line) = rx.try_recv() {
            assert_eq!(line, "done");
            break;
        }
        assert!(Instant::now() < deadline, "fixture did not finish");
    }
    // Records are batched without wakeups: read what is left.
    for _ in 0..3 {
        feed(&mut tracer, &mut ledger, &mut maps);
    }
    let snapshot = ledger.snapshot();
    let lost = ledger.lost();
    let mut unwinder = Unwinder::new();
    let mut symbolizer = Symbolizer::new();
    let mut leaks = Vec::new();
    for leak in &snapshot {
        let Resource::Heap(b) = &leak.resource else {
            continue;
        };
        let raw = tracer.raw_stack(b.stack);
        let unwound = unwinder.unwind(&maps, b.pid, b.time, &raw);
        let functions = symbolizer
            .symbolize(&unwound.frames)
            .into_iter()
            .map(|f| f.function.unwrap_or_else(|| "?".into()))
            .collect();
        leaks.push(Leak {
            pid: b.pid,
            size: b.size,
            functions,
        });
    }
    writeln!(stdin, "quit").expect("write quit");
    drop(stdin);
    let st = child.wait().expect("wait for fixture");
    assert!(st.success(), "fixture exited with {st}");
    Outcome {
        pid,
        leaks,
        allocs,
        frees,
        lost,
        notes: tracer.notes(),
    }
}

fn expected(fork: bool) -> BTreeMap<String, (usize, u64)> {
    let mut m: BTreeMap<String, (usize, u64)> = [
        ("wrapper1", (13, 13 * 64)),
        ("grow_buffer", (7, 7 * 96)),
        ("aligned_leak", (5, 5 * 80)),
        ("zeroed_leak", (3, 3 * 24)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if fork {
        m.insert("child_leak".into(), (2, 64));
    }
    m
}

fn check(out: &Outcome, fork: bool) {
    assert_eq!(
        out.by_function(),
        expected(fork),
        "leaks by function; all leaks: {:#?}",
        out.leaks
    );
    assert_eq!(out.lost, 0, "events lost");
    // Seed-003 shape: the stack goes through strdup, parse_line, wrapper1,
    // main, in that order (unwound from the allocator's caller).
    let w1 = out
        .leaks
        .iter()
        .find(|l| l.functions.iter().any(|f| f == "wrapper1"))
        .expect("a wrapper1 leak");
    let pos = |name: &str| w1.functions.iter().position(|f| f == name);
    let (p, w, m) = (pos("parse_line"), pos("wrapper1"), pos("main"));
    assert!(
        p.is_some() && p < w && w < m,
        "wrapper1 stack: {:?}",
        w1.functions
    );
    eprintln!("a wrapper1 stack: {:?}", w1.functions);
    assert!(
        w1.functions[0].contains("strdup"),
        "frame 0 is the allocator's caller (strdup): {:?}",
        w1.functions
    );
    for f in ["wrapper2", "balanced", "free_old", "before_attach"] {
        assert!(
            out.leaks
                .iter()
                .all(|l| !l.functions.iter().any(|g| g == f)),
            "{f} must not leak: {:#?}",
            out.leaks
        );
    }
    // Every allocator call after the attach, and exactly the frees of
    // blocks allocated after it (the 11 older blocks' frees are ignored).
    let child_allocs = if fork { 2 } else { 0 };
    assert_eq!((out.allocs, out.frees), (110 + child_allocs, 82));
    for l in out
        .leaks
        .iter()
        .filter(|l| !l.functions.contains(&"child_leak".into()))
    {
        assert_eq!(l.pid, out.pid);
    }
}

#[test]
fn root_attach_counts_leaks_by_function() {
    if !leakscope_testutil::require_root("root_attach_counts_leaks_by_function") {
        return;
    }
    for flags in [
        &["-fomit-frame-pointer"][..],
        &["-fno-omit-frame-pointer"][..],
    ] {
        let out = run(&build(flags), &[], Config::default());
        eprintln!(
            "{flags:?}: {} allocs, {} frees, leaks {:?}",
            out.allocs,
            out.frees,
            out.by_function()
        );
        check(&out, false);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
    }
}

#[test]
fn root_attach_static_binary() {
    if !leakscope_testutil::require_root("root_attach_static_binary") {
        return;
    }
    let out = run(
        &build(&["-static", "-fomit-frame-pointer"]),
        &[],
        Config::default(),
    );
    check(&out, false);
}

#[test]
fn root_attach_follows_fork() {
    if !leakscope_testutil::require_root("root_attach_follows_fork") {
        return;
    }
    let out = run(
        &build(&["-fomit-frame-pointer"]),
        &["fork"],
        Config::default(),
    );
    check(&out, true);
    let child: Vec<&Leak> = out
        .leaks
        .iter()
        .filter(|l| l.functions.iter().any(|f| f == "child_leak"))
        .collect();
    assert!(child.iter().all(|l| l.pid != out.pid), "{child:?}");
}

#[test]
fn root_attach_sampled_says_so() {
    if !leakscope_testutil::require_root("root_attach_sampled_says_so") {
        return;
    }
    let out = run(
        &build(&["-fomit-frame-pointer"]),
        &[],
        Config {
            sample_every: 4,
            ..Config::default()
        },
    );
    let total: usize = out.by_function().values().map(|v| v.0).sum();
    assert!(total <= 28, "{:?}", out.by_function());
    assert!(out.lost > 0, "sampled-out allocations are reported as lost");
    assert!(
        out.notes.iter().any(|n| n.contains("1 of 4")),
        "{:?}",
        out.notes
    );
}

#[test]
fn root_attach_unknown_allocator_prefix_fails_clearly() {
    if !leakscope_testutil::require_root("root_attach_unknown_allocator_prefix_fails_clearly") {
        return;
    }
    let mut child = Command::new(build(&["-fomit-frame-pointer"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fixture");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("pid line");
    let pid = Pid(line.trim().parse().expect("pid"));
    let mut tracer = HeapTracer::new(Config {
        allocator_prefix: Some("je_".into()),
        ..Config::default()
    })
    .expect("load");
    let err = tracer.attach(pid).expect_err("no je_malloc in the fixture");
    assert!(err.to_string().contains("je_malloc"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}
