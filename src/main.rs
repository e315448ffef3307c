//! The `drover` binary: the library's [`drover::run`] with the built-in app.
//! With `-- COMMAND`, the built-in app is unused and COMMAND runs as workers.

fn main() -> std::process::ExitCode {
    drover::run(drover::builtin::app)
}
