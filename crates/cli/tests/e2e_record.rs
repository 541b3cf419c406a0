//! `record` and `report`: a report made from a recording is the one `run`
//! makes (byte for byte, `run` being a recording in memory followed by its
//! report); a killed recorder's file reads up to its last complete chunk;
//! bad files are refused in one line with exit status 5.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use leakscope_testutil::{fixture, require_root, workspace_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// `fixtures/heap/NAME.c`, built under its own name `tag` (each test
/// removes its copy, which `report` still reads to symbolize).
fn heap_fixture(name: &str, tag: &str) -> PathBuf {
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("record-{tag}-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-g", "-O2", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&bin)
        .arg(workspace_root().join(format!("fixtures/heap/{name}.c")))
        .status()
        .expect("run cc");
    assert!(st.success());
    bin
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("leakscope-rec-{}-{name}", std::process::id()))
}

fn leakscope(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run leakscope")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn report_json(rec: &Path) -> Value {
    let out = tmp("report.json");
    let o = leakscope(&["report", s(rec), "--format", "json", "-o", s(&out)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(out);
    v
}

fn functions(g: &Value) -> Vec<&str> {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect()
}

/// Leak count per function of `names` found on each group's stack.
fn counts(r: &Value, names: &[&str]) -> Vec<(String, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let f = functions(g);
        let who = names
            .iter()
            .find(|n| f.contains(n))
            .unwrap_or_else(|| panic!("unexplained group: {g}"));
        *out.entry(who.to_string()).or_insert(0) += g["count"].as_u64().unwrap();
    }
    out.into_iter().collect()
}

/// `run --record` keeps the recording its report was made of: `report`
/// of it prints the very same bytes, as JSON and as text.
#[test]
fn run_and_the_report_of_its_recording_are_identical() {
    let bin = heap_fixture("nested", "identical");
    for format in ["json", "text"] {
        let (live, rec, replay) = (tmp("live"), tmp("run.lsr"), tmp("replay"));
        let o = leakscope(&[
            "run",
            "--backend",
            "preload",
            "--track",
            "heap",
            "--format",
            format,
            "-o",
            s(&live),
            "--record",
            s(&rec),
            "--",
            s(&bin),
        ]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        let o = leakscope(&["report", s(&rec), "--format", format, "-o", s(&replay)]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        let (a, b) = (
            std::fs::read_to_string(&live).unwrap(),
            std::fs::read_to_string(&replay).unwrap(),
        );
        assert!(a.contains("parse_line"), "{a}");
        assert_eq!(a, b, "{format}: the live report and the recording's differ");
        for p in [live, rec, replay] {
            let _ = std::fs::remove_file(p);
        }
    }
    let _ = std::fs::remove_file(bin);
}

/// `record -o` then `report`: the leaks `run` finds (13 x 64 bytes from
/// parse_line under wrapper1; wrapper2's blocks were freed), in a file
/// only its owner can read, also when it replaced a readable one.
#[test]
fn record_then_report() {
    let bin = heap_fixture("nested", "record");
    let rec = tmp("nested.lsr");
    std::fs::write(&rec, "old").unwrap();
    std::fs::set_permissions(&rec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let r = report_json(&rec);
    let leaks = r["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "{leaks:#?}");
    assert_eq!(
        (leaks[0]["count"].as_u64(), leaks[0]["bytes"].as_u64()),
        (Some(13), Some(832))
    );
    let f = functions(&leaks[0]);
    assert!(
        f.contains(&"parse_line") && f.contains(&"wrapper1"),
        "{f:?}"
    );
    assert!(!f.contains(&"wrapper2"));
    assert_eq!(r["target"]["exit_code"], 0);
    assert_eq!(r["backend"], "preload");
    assert_eq!(r["coverage"][1]["kind"], "heap");
    assert_eq!(r["coverage"][1]["traced"], "all");
    let _ = std::fs::remove_file(rec);
    let _ = std::fs::remove_file(bin);
}

/// A recorder killed with SIGKILL leaves a file that reports what it had
/// committed (11 blocks from leak_early), saying that it ends early.
#[test]
fn a_killed_recorder_leaves_a_readable_recording() {
    let bin = heap_fixture("drip", "killed");
    let rec = tmp("killed.lsr");
    let mut ls = Command::new(BIN)
        .args([
            "record",
            "-o",
            s(&rec),
            "--commit-every",
            "0.1",
            "--backend",
            "preload",
        ])
        .args(["--track", "heap", "--", s(&bin), "0", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(ls.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let drip: i32 = line.trim().parse().expect("the fixture's pid");
    // Until a commit holds the 11 early leaks, of one stack (a bound,
    // not a measure).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let most = std::fs::read(&rec)
            .ok()
            .and_then(|b| leakscope_record::read(&b).ok())
            .map(|r| {
                let mut per = std::collections::HashMap::new();
                for l in &r.leaks {
                    *per.entry(l.leak.resource.stack()).or_insert(0) += 1;
                }
                per.into_values().max().unwrap_or(0)
            });
        if most == Some(11) {
            break;
        }
        assert!(Instant::now() < deadline, "no commit with 11 leaks");
        std::thread::sleep(Duration::from_millis(50));
    }
    ls.kill().unwrap();
    ls.wait().unwrap();
    // SAFETY: kill(2) on the fixture the killed recorder left running.
    unsafe { libc::kill(drip, libc::SIGKILL) };
    let r = report_json(&rec);
    // (besides a balanced block allocated, not yet freed, then, and
    // stdout's buffer, which only the process's exit says is the C
    // runtime's)
    let early: u64 = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| functions(g).contains(&"leak_early"))
        .map(|g| g["count"].as_u64().unwrap())
        .sum();
    assert_eq!(early, 11, "{r:#}");
    assert_eq!(r["target"]["exit_code"], Value::Null);
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("the recorder stopped before the trace ended"),
        "{notes}"
    );
    let text = leakscope(&["report", s(&rec)]);
    assert_eq!(text.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&text.stderr).contains("leak_early"));
    let _ = std::fs::remove_file(rec);
    let _ = std::fs::remove_file(bin);
}

/// Growth: the recording holds each group's count over time; balanced
/// allocations (thousands) are never written.
#[test]
fn growth_per_group_is_recorded() {
    let bin = heap_fixture("drip", "growth");
    let rec = tmp("growth.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--commit-every",
        "0.1",
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
        "700",
        "100",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let r = leakscope_record::read_file(&rec).unwrap();
    assert!(r.end.is_some());
    // Only the leaks are written (and stdout's buffer, which the C
    // runtime keeps: suppressed in reports).
    let written: Vec<_> = r.leaks.iter().filter(|l| l.kept.is_none()).collect();
    assert_eq!(written.len(), 11 + 7);
    assert_eq!(r.leaks.len(), 11 + 7 + 1);
    // Each group's last count, and its series never shrinks (leaks only).
    let mut series: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for p in &r.growth {
        for g in &p.changed {
            series.entry(g.stack).or_default().push(g.count);
        }
    }
    // 11 and 7 leaked, 1 for stdout's buffer; a balanced block caught
    // between its malloc and its free at a commit comes back to 0.
    let mut last: Vec<u64> = series.values().map(|v| *v.last().unwrap()).collect();
    last.sort();
    last.retain(|n| *n > 0);
    assert_eq!(last, [1, 7, 11], "{series:?}");
    assert!(series
        .values()
        .filter(|v| v.last() >= Some(&7))
        .all(|v| v.windows(2).all(|w| w[0] <= w[1])));
    let j = report_json(&rec);
    assert_eq!(
        counts(&j, &["leak_early", "leak_slowly"]),
        [
            ("leak_early".to_string(), 11),
            ("leak_slowly".to_string(), 7)
        ]
    );
    let _ = std::fs::remove_file(rec);
    let _ = std::fs::remove_file(bin);
}

/// Refused in one line with exit status 5: not a recording, cut before
/// its first chunk, a newer format, a damaged chunk. A file cut inside
/// its last chunk reads up to the chunk before.
#[test]
fn bad_recordings_are_refused_in_one_line() {
    let bin = heap_fixture("nested", "bad");
    let good = tmp("good.lsr");
    let o = leakscope(&[
        "run",
        "--backend",
        "preload",
        "--track",
        "heap",
        "--record",
        s(&good),
        "-o",
        "/dev/null",
        "--",
        s(&bin),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp("bad.lsr");
    let refused = |content: &[u8], says: &str| {
        std::fs::write(&bad, content).unwrap();
        let o = leakscope(&["report", s(&bad)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{says}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
    };
    refused(
        b"leakscope: `./x` exited with 0\n",
        "not a leakscope recording",
    );
    refused(&bytes[..12], "truncated recording");
    refused(&bytes[..16], "truncated recording");
    let mut newer = bytes.clone();
    newer[8] = 99;
    refused(&newer, "recording format 99 is newer");
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 20] ^= 0x40;
    refused(
        &flipped,
        "corrupt recording: a chunk's checksum does not match",
    );
    // Cut inside the last chunk (the end record): what came before.
    std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
    let o = leakscope(&["report", s(&bad), "--format", "json"]);
    assert_eq!(o.status.code(), Some(0));
    let missing = leakscope(&["report", "/nonexistent/x.lsr"]);
    assert_eq!(missing.status.code(), Some(125));
    for p in [good, bad, bin] {
        let _ = std::fs::remove_file(p);
    }
}

/// fds through eBPF: `record` then `report` finds fd_leak's table.
#[test]
fn root_record_fds_then_report() {
    if !require_root("root_record_fds_then_report") {
        return;
    }
    let rec = tmp("fd.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--track",
        "fd",
        "--",
        s(&fixture("fd_leak")),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let r = report_json(&rec);
    assert_eq!(r["backend"], "ebpf");
    let mut want: Vec<(String, u64)> = leakscope_testutil::expected_leaks("fd_leak")
        .iter()
        .map(|l| (l.function.to_string(), l.count as u64))
        .collect();
    want.sort();
    assert_eq!(counts(&r, &["load_config", "scan_dir", "make_pipe"]), want);
    // The same groups as pprof samples.
    let p = pprof_of(&rec);
    let mut got = std::collections::BTreeMap::new();
    for i in 0..p.sample.len() {
        let f = sample_functions(&p, i);
        let who = ["load_config", "scan_dir", "make_pipe"]
            .into_iter()
            .find(|n| f.iter().any(|x| x == n))
            .unwrap_or_else(|| panic!("unexplained sample {f:?}"));
        *got.entry(who.to_string()).or_insert(0u64) += p.sample[i].value[0] as u64;
    }
    assert_eq!(got.into_iter().collect::<Vec<_>>(), want);
    let _ = std::fs::remove_file(rec);
}

/// `record -p`: a running process's leaks made after attaching (also by
/// a child forked then), with the fds open before listed apart.
#[test]
fn root_record_an_attached_process() {
    use std::io::Write;
    if !require_root("root_record_an_attached_process") {
        return;
    }
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("record-attach-{}", std::process::id()));
    let st = Command::new("cc")
        .args(["-g", "-O2", "-o"])
        .arg(&bin)
        .arg(workspace_root().join("fixtures/attach/attach_target.c"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut target = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = target.stdin.take().unwrap();
    let mut from = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    let pid = line.trim().to_string();
    line.clear();
    from.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let rec = tmp("attach.lsr");
    let mut ls = Command::new(BIN)
        .args(["record", "-o", s(&rec), "-p", &pid])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(ls.stderr.take().unwrap());
    let mut ready = String::new();
    err.read_line(&mut ready).unwrap();
    assert!(ready.starts_with("Recording pid"), "{ready}");
    for cmd in ["fork 5", "leak 7", "churn 101"] {
        writeln!(to, "{cmd}").unwrap();
        let mut ack = String::new();
        from.read_line(&mut ack).unwrap();
        assert_eq!(ack.trim(), "ok", "{cmd}");
    }
    writeln!(to, "quit").unwrap();
    assert!(target.wait().unwrap().success());
    assert_eq!(ls.wait().unwrap().code(), Some(0));
    let r = report_json(&rec);
    assert_eq!(r["target"]["exit_code"], 0);
    assert_eq!(
        counts(&r, &["child_drip", "drip"]),
        [("child_drip".to_string(), 5), ("drip".to_string(), 7)]
    );
    let before = r["preexisting"].as_array().expect("preexisting");
    assert!(before.iter().filter(|p| p["detail"] == "/dev/null").count() >= 3);
    let _ = std::fs::remove_file(rec);
    let _ = std::fs::remove_file(bin);
}

/// The gzipped pprof profile of a recording, decoded: its raw fields by
/// their numbers in profile.proto (sample 2, string_table 6), and through
/// leakscope-report's messages the leak groups as samples.
fn pprof_of(rec: &Path) -> leakscope_report::pprof::proto::Profile {
    use prost::Message;
    let out = tmp("profile.pb.gz");
    let o = leakscope(&["report", s(rec), "--format", "pprof", "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let gz = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(out);
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).expect("gzip");
    let p = leakscope_report::pprof::proto::Profile::decode(&raw[..]).expect("profile.proto");
    // The outer fields as the wire has them, independently of those
    // message definitions.
    let (mut samples, mut strings) = (0, Vec::new());
    let mut b = &raw[..];
    let varint = |b: &mut &[u8]| -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let x = b[0];
            *b = &b[1..];
            v |= u64::from(x & 0x7f) << shift;
            if x & 0x80 == 0 {
                break;
            }
        }
        v
    };
    while !b.is_empty() {
        let key = varint(&mut b);
        match key & 7 {
            0 => {
                varint(&mut b);
            }
            2 => {
                let n = varint(&mut b) as usize;
                match key >> 3 {
                    2 => samples += 1,
                    6 => strings.push(String::from_utf8(b[..n].to_vec()).unwrap()),
                    _ => {}
                }
                b = &b[n..];
            }
            w => panic!("wire type {w} at top level"),
        }
    }
    assert_eq!(samples, p.sample.len());
    assert_eq!(strings, p.string_table);
    assert_eq!(strings[0], "");
    p
}

/// Function names of a sample's stack, leaf first (inlined lines first).
fn sample_functions(p: &leakscope_report::pprof::proto::Profile, i: usize) -> Vec<String> {
    let mut out = Vec::new();
    for id in &p.sample[i].location_id {
        let loc = &p.location[*id as usize - 1];
        assert_eq!(loc.id, *id);
        for line in &loc.line {
            let f = &p.function[line.function_id as usize - 1];
            out.push(p.string_table[f.name as usize].clone());
        }
    }
    out
}

/// `report --format pprof` and `--format svg`: nested's 13 x 64 bytes as
/// one sample valued [13, 832] whose stack reads parse_line, wrapper1,
/// main from the leaf, labelled heap; the flame graph names them.
#[test]
fn report_as_pprof_and_flame_graph() {
    let bin = heap_fixture("nested", "formats");
    let rec = tmp("formats.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let p = pprof_of(&rec);
    let st = |i: i64| p.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (st(t.r#type), st(t.unit)))
        .collect();
    assert_eq!(
        types,
        [("leaked_objects", "count"), ("leaked_space", "bytes")]
    );
    assert_eq!(p.sample.len(), 1);
    assert_eq!(p.sample[0].value, [13, 832]);
    let labels: Vec<(&str, &str)> = p.sample[0]
        .label
        .iter()
        .map(|l| (st(l.key), st(l.str)))
        .collect();
    assert_eq!(labels, [("kind", "heap"), ("resource", "heap")]);
    let f = sample_functions(&p, 0);
    let at = |n: &str| {
        f.iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n}: {f:?}"))
    };
    assert!(
        at("parse_line") < at("wrapper1") && at("wrapper1") < at("main"),
        "{f:?}"
    );
    assert!(!f.iter().any(|x| x == "wrapper2"));
    let svg = tmp("flame.svg");
    let o = leakscope(&["report", s(&rec), "--format", "svg", "-o", s(&svg)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg"), "not an SVG");
    assert!(text.contains("parse_line") && text.contains("wrapper1"));
    assert!(!text.contains("wrapper2"));
    // Binary formats are not written to a terminal by default.
    let o = leakscope(&["report", s(&rec), "--format", "pprof"]);
    assert_eq!(o.status.code(), Some(125));
    for f in [rec, svg, bin] {
        let _ = std::fs::remove_file(f);
    }
}

/// `report --format html`: one page, nothing fetched (no scripts, no
/// links, no sources), the leak groups named, and a growth chart for each
/// top group: 11 blocks plateaued since leak_early, leak_slowly's 6.
#[test]
fn report_as_html() {
    let bin = heap_fixture("drip", "html");
    let rec = tmp("html.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--commit-every",
        "0.1",
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
        "600",
        "100",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let html = tmp("report.html");
    let o = leakscope(&["report", s(&rec), "--format", "html", "-o", s(&html)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for outside in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !page.contains(outside),
            "{outside} in a self-contained page"
        );
    }
    assert!(page.contains("<h3>[1] 11 heap blocks (528 bytes) leaked from leak_early</h3>"));
    assert!(page.contains("<h3>[2] 6 heap blocks (192 bytes) leaked from leak_slowly</h3>"));
    assert!(page.contains("plateaued: 11 since"), "leak_early's trend");
    assert_eq!(page.matches("<polyline").count(), 2, "a chart per group");
    assert!(!page.contains("balanced_alloc"));
    for f in [rec, html, bin] {
        let _ = std::fs::remove_file(f);
    }
}

/// `report --debug-dir`: a module stripped after recording (same build
/// id) is symbolized from its debug file in DIR/.build-id/ab/cdef.debug;
/// without it the leaking function has no name.
#[test]
fn report_finds_debug_files_by_build_id() {
    let bin = heap_fixture("nested", "debugdir");
    let rec = tmp("debugdir.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let build_id = leakscope_record::read_file(&rec)
        .unwrap()
        .stacks
        .iter()
        .flat_map(|st| &st.frames)
        .filter_map(|f| f.module.as_ref())
        .find(|m| Path::new(&m.path) == bin)
        .and_then(|m| m.build_id.clone())
        .expect("the fixture's build id was recorded");
    let dir = tmp("debug-dir");
    let at = dir.join(".build-id").join(&build_id[..2]);
    std::fs::create_dir_all(&at).unwrap();
    let debug = at.join(format!("{}.debug", &build_id[2..]));
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        assert!(
            Command::new(cmd).args(args).status().unwrap().success(),
            "{cmd}"
        );
    };
    run(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            bin.as_os_str(),
            debug.as_os_str(),
        ],
    );
    run("strip", &["--strip-all".as_ref(), bin.as_os_str()]);
    let names = |extra: &[&str]| -> Vec<String> {
        let out = tmp("debugdir.json");
        let mut args = vec!["report", s(&rec), "--format", "json", "-o", s(&out)];
        args.extend_from_slice(extra);
        assert_eq!(leakscope(&args).status.code(), Some(0));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let _ = std::fs::remove_file(out);
        r["leaks"][0]["stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| format!("{}:{}", f["function"].as_str().unwrap_or("?"), f["line"]))
            .collect()
    };
    let stripped = names(&[]);
    assert!(
        !stripped.iter().any(|f| f.starts_with("parse_line:")),
        "{stripped:?}"
    );
    let found = names(&["--debug-dir", s(&dir)]);
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("parse_line:") && !f.ends_with("null")),
        "{found:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
    for f in [rec, bin] {
        let _ = std::fs::remove_file(f);
    }
}

/// `report --gen-suppressions`: a rule per group, named after the
/// function the report names; reporting again with it leaves no leak and
/// counts the 13 blocks as suppressed.
#[test]
fn generated_suppressions_suppress_the_groups() {
    let bin = heap_fixture("nested", "gensupp");
    let rec = tmp("gensupp.lsr");
    let o = leakscope(&[
        "record",
        "-o",
        s(&rec),
        "--backend",
        "preload",
        "--track",
        "heap",
        "--",
        s(&bin),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let supp = tmp("known.supp");
    let o = leakscope(&["report", s(&rec), "--gen-suppressions", "-o", s(&supp)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = std::fs::read_to_string(&supp).unwrap();
    let rules: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rules, ["leak:parse_line"], "{text}");
    let out = tmp("gensupp.json");
    let o = leakscope(&[
        "report",
        s(&rec),
        "--suppressions",
        s(&supp),
        "--format",
        "json",
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["leaks"].as_array().unwrap().len(), 0);
    let by_file: u64 = r["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pattern"] == "parse_line")
        .map(|s| s["count"].as_u64().unwrap())
        .sum();
    assert_eq!(by_file, 13, "{r:#}");
    for f in [rec, supp, out, bin] {
        let _ = std::fs::remove_file(f);
    }
}
