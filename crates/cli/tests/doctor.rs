//! `leakscope doctor`: the verifier's budget on the running kernel (issue
//! 9): every program of every eBPF backend loads, each with at most
//! 100,000 processed instructions, all of them in at most 0.5 s of CPU.
//! Under software emulation (`scripts/kernels` sets LEAKSCOPE_EMULATED=1)
//! CPU time is several times a real machine's and says nothing of it: the
//! CPU budget is then reported, not enforced; the instruction budget is.

use std::process::Command;

use leakscope_testutil::require_root;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// The project's budget per program; the verifier's own limit is 1,000,000.
const INSN_BUDGET: u64 = 100_000;
/// The project's budget for loading every program, in CPU milliseconds.
const LOAD_CPU_BUDGET_MS: f64 = 500.0;

#[test]
fn root_verifier_budget() {
    if !require_root("root_verifier_budget") {
        return;
    }
    let out = Command::new(BIN)
        .args(["doctor", "--format", "json"])
        .output()
        .expect("run leakscope doctor");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}); status {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let release = report["kernel"]["release"].as_str().unwrap_or("?");
    let mut problems = Vec::new();
    let mut table = String::new();
    for b in report["backends"].as_array().expect("backends") {
        let name = b["name"].as_str().unwrap();
        if !name.starts_with("ebpf-") {
            continue;
        }
        if b["works"] != true {
            problems.push(format!("{name}: {}", b["reason"]));
        }
        for p in b["programs"].as_array().unwrap() {
            let prog = p["name"].as_str().unwrap();
            let insns = p["verified_insns"].as_u64();
            table.push_str(&format!(
                "  {name:<12} {prog:<16} {:>9} insns {:>9} ms\n",
                insns.map_or("?".into(), |n| n.to_string()),
                p["verify_ms"]
                    .as_f64()
                    .map_or("?".into(), |ms| format!("{ms:.1}"))
            ));
            match insns {
                Some(n) if n > INSN_BUDGET => problems.push(format!(
                    "{name}/{prog}: {n} processed insns, over the budget of {INSN_BUDGET}"
                )),
                None => problems.push(format!(
                    "{name}/{prog}: the kernel did not say how many insns it processed"
                )),
                _ => {}
            }
        }
    }
    let cpu = report["load_cpu_ms_total"]
        .as_f64()
        .expect("load_cpu_ms_total");
    let emulated = std::env::var("LEAKSCOPE_EMULATED").as_deref() == Ok("1");
    if emulated {
        eprintln!(
            "root_verifier_budget: emulated machine (LEAKSCOPE_EMULATED=1): \
             the load's {cpu} ms of CPU is not held to the {LOAD_CPU_BUDGET_MS} ms budget"
        );
    } else if cpu > LOAD_CPU_BUDGET_MS {
        problems.push(format!(
            "loading every program took {cpu} ms of CPU, over the budget of \
             {LOAD_CPU_BUDGET_MS} ms"
        ));
    }
    eprintln!("verifier cost on {release} ({cpu} ms of CPU in all):\n{table}");
    assert!(
        problems.is_empty(),
        "on {release}:\n  {}\n{table}",
        problems.join("\n  ")
    );
}
