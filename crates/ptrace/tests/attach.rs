//! Attaching to a running process with PTRACE_SEIZE and detaching from it
//! (issue 13), checked while the tracer still runs: once the kernel has
//! let a tracer go (it exited), nothing is left to see, so only here does
//! a thread left stopped or traced show.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use leakscope_event::{Backend, Event, Pid};
use leakscope_testutil::workspace_root;

fn build_target() -> std::path::PathBuf {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("ptrace_attach_target-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-g", "-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(workspace_root().join("fixtures/attach/attach_target.c"))
        .status()
        .expect("cc");
    assert!(st.success());
    bin
}

fn say(to: &mut ChildStdin, from: &mut BufReader<ChildStdout>, cmd: &str) {
    writeln!(to, "{cmd}").unwrap();
    let mut ack = String::new();
    from.read_line(&mut ack).unwrap();
    assert_eq!(ack.trim(), "ok", "{cmd}");
}

/// (State, TracerPid) of every thread of `pid`.
fn thread_states(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            };
            (field("State:"), field("TracerPid:"))
        })
        .collect()
}

/// Both threads of the fixture are seized (the worker was started before
/// the attach): their fds are seen. After the detach, while the tracer
/// lives on, no thread is stopped or traced, and the process obeys, in
/// both threads, and exits with its own status.
#[test]
fn detach_leaves_every_thread_running_untraced() {
    let bin = build_target();
    let mut target: Child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = target.stdin.take().unwrap();
    let mut from = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    let pid: u32 = line.trim().parse().unwrap();
    from.read_line(&mut line).unwrap();

    let mut tracer = leakscope_ptrace::Tracer::new(Default::default())
        .expect("ptrace is allowed on a child of ours");
    tracer.attach(Pid(pid)).expect("attach to a child of ours");
    assert!(tracer.every_syscall());
    say(&mut to, &mut from, "leak 7");
    say(&mut to, &mut from, "tleak 11");
    let mut opened = std::collections::BTreeMap::new();
    // A guard against a hang, not a measure: the events are there at once.
    let give_up = Instant::now() + Duration::from_secs(20);
    while opened.values().sum::<u32>() < 18 && Instant::now() < give_up {
        tracer
            .poll(Duration::from_millis(50), &mut |ev| {
                if let Event::Acquire(a) = ev {
                    *opened.entry(a.tid.0 == pid).or_insert(0) += 1;
                }
            })
            .unwrap();
    }
    // 7 in the main thread, 11 in the worker.
    assert_eq!(
        opened,
        std::collections::BTreeMap::from([(false, 11), (true, 7)])
    );

    tracer.detach(Duration::from_secs(5));
    let states = thread_states(pid);
    assert_eq!(states.len(), 2, "{states:?}");
    for (state, tracer_pid) in &states {
        assert!(
            !state.starts_with('t') && !state.starts_with('T'),
            "a thread left stopped: {states:?}"
        );
        assert_eq!(tracer_pid, "0", "a thread left traced: {states:?}");
    }
    say(&mut to, &mut from, "leak 2");
    say(&mut to, &mut from, "tleak 3");
    say(&mut to, &mut from, "thread 2");
    writeln!(to, "exit 9").unwrap();
    assert_eq!(target.wait().unwrap().code(), Some(9));
    drop(tracer);
    let _ = std::fs::remove_file(&bin);
}
