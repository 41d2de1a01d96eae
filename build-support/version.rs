// Included by the build scripts of both binaries (`agentkeys-broker`,
// `agentkeys`): the commit they were built from, as AGENTKEYS_GIT_SHA, for
// `--version` and the broker's build-info metric. A source tree without
// git (a release tarball) passes it in the same variable, or reads
// "unknown".

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn emit_git_sha() {
    println!("cargo:rerun-if-env-changed=AGENTKEYS_GIT_SHA");
    let sha = std::env::var("AGENTKEYS_GIT_SHA")
        .ok()
        .filter(|sha| !sha.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=AGENTKEYS_GIT_SHA={sha}");
    // Built again when HEAD moves: HEAD itself, the branch it names, and
    // the packed refs (only the files that exist: a missing one would
    // rebuild every time).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) {
        let branch = git(&["symbolic-ref", "-q", "HEAD"]);
        let watched = [Some("HEAD".to_owned()), branch, Some("packed-refs".to_owned())];
        for file in watched.into_iter().flatten().map(|f| dir.join(f)) {
            if file.exists() {
                println!("cargo:rerun-if-changed={}", file.display());
            }
        }
    }
}
