//! The `agentkeys` binary as a user meets it: its version, its help, its
//! completions and man page, and a clear error where a path cannot be
//! resolved (issue 17).

use std::process::{Command, Output};

fn agentkeys(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentkeys"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(args: &[&str]) -> String {
    let output = agentkeys(args);
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn version_help_completions_and_man_page_name_agentkeys() {
    let version = stdout(&["--version"]);
    let expected = format!("agentkeys {} (", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&expected), "{version}");
    let help = stdout(&["--help"]);
    assert!(
        help.contains("Exit codes") && help.contains("3 authentication refused"),
        "{help}"
    );
    let bash = stdout(&["completions", "bash"]);
    assert!(
        bash.contains("_agentkeys()") && bash.contains("aws-credentials"),
        "{bash}"
    );
    let man = stdout(&["manpage"]);
    assert!(man.contains(".TH agentkeys"), "{man}");
}

#[test]
fn a_state_dir_under_home_without_home_is_an_error_not_a_relative_path() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_agentkeys"))
        .arg("keygen")
        .env_remove("HOME")
        .env_remove("AGENTKEYS_STATE_DIR")
        .env_remove("AGENTKEYS_KEY_FILE")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HOME is not set"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written relative to the working directory"
    );
}
