include!("build-support/version.rs");

fn main() {
    emit_git_sha();
}
