//! The Makefile's targets run the binary cargo built, wherever `CARGO_TARGET_DIR` puts it, and
//! `make run` listens where it is told (checked with `make -n`, which prints the commands
//! without running them).

use std::process::Command;

fn make_n(target: &str, env: &[(&str, &str)], vars: &[&str]) -> String {
    let mut cmd = Command::new("make");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-n", "--no-print-directory", target])
        .args(vars)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("TANDEM_BIND")
        .env_remove("BIND")
        .env_remove("PORT")
        .env_remove("TANDEM");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("make is installed");
    assert!(
        out.status.success(),
        "make -n {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn targets_take_the_binary_from_cargo_target_dir() {
    let shared = [("CARGO_TARGET_DIR", "/srv/shared-target")];
    for target in ["run", "demo-data", "test-ui", "demo-model", "cluster"] {
        let plan = make_n(target, &shared, &[]);
        assert!(
            plan.contains("/srv/shared-target/debug/tandem"),
            "make {target} ignores CARGO_TARGET_DIR:\n{plan}"
        );
        assert!(
            !plan.contains("./target/debug") && !plan.contains(" target/debug"),
            "make {target} still runs ./target/debug:\n{plan}"
        );
    }
    for target in ["bench-ann", "bench-serve", "bench-lifecycle"] {
        let plan = make_n(target, &shared, &[]);
        assert!(
            plan.contains("/srv/shared-target/release"),
            "make {target} ignores CARGO_TARGET_DIR:\n{plan}"
        );
    }
    // Without it, target/ as before.
    assert!(make_n("run", &[], &[]).contains("TANDEM_BIN=target/debug/tandem"));
}

#[test]
fn make_run_listens_on_localhost_8080_unless_told_otherwise() {
    let plan = make_n("run", &[], &[]);
    assert!(
        plan.contains("scripts/run-demo.sh data/demo/raw 127.0.0.1:8080"),
        "{plan}"
    );
    assert!(
        !plan.contains("0.0.0.0"),
        "listens on every interface by default:\n{plan}"
    );
    let plan = make_n("run", &[], &["PORT=9090", "BIND=0.0.0.0"]);
    assert!(plan.contains(" 0.0.0.0:9090"), "{plan}");
    let plan = make_n("run", &[("TANDEM_BIND", "127.0.0.1:7000")], &[]);
    assert!(plan.contains(" 127.0.0.1:7000"), "{plan}");
}
