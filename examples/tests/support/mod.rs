//! The process harness shared by the example binaries' tests: a child process with its
//! stdout and stderr in files, its JSON event lines, bounded waits, signals by pid, and a
//! drop that ends it (only this test's own child, by its handle).

// Each test file uses a different part of the harness.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a bounded wait looks again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How long a process may take to print its `ready` line.
pub(crate) const READY_BOUND: Duration = Duration::from_secs(60);

/// A process this test started, with its stdout and stderr in files.
pub(crate) struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program` with `args` and none of the Redis or API variables of the test's own
    /// environment.
    pub(crate) fn spawn(dir: impl AsRef<Path>, name: &str, program: &str, args: &[String]) -> Self {
        Self::spawn_with_env(dir, name, program, args, &[])
    }

    /// As [`Proc::spawn`], with `envs` set (a Redis URL with a password belongs here, never
    /// on the command line).
    pub(crate) fn spawn_with_env(
        dir: impl AsRef<Path>,
        name: &str,
        program: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Self {
        let dir = dir.as_ref();
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let mut command = Command::new(program);
        command
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .env_remove("SAGA_API_URL")
            .env_remove("SAGA_API_TOKEN")
            .env_remove("SAGA_API_TOKEN_FILE")
            .env_remove("SAGA_API_CA_FILE")
            .env_remove("SAGA_API_TOKENS")
            .env_remove("SAGA_API_TOKENS_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {program}: {err}"));
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            exit: None,
        }
    }

    /// Its pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its name in this test.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// What it printed on stdout so far.
    pub(crate) fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What it printed on stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The JSON line on stdout whose `event` is `event`.
    pub(crate) fn event(&self, event: &str) -> Option<serde_json::Value> {
        self.stdout()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|v| v["event"] == event)
    }

    /// Its exit status, once it has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().unwrap();
        }
        self.exit
    }

    /// Waits for its `{"event":"ready"}` line (panics if it exits first, or after
    /// [`READY_BOUND`]).
    pub(crate) fn wait_ready(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            if let Some(ready) = self.event("ready") {
                return ready;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {READY_BOUND:?}:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`, ...) to its pid.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits until it exits (panics after `bound`; the drop then ends it).
    pub(crate) fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {bound:?}:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL, by the child's handle (no pid reuse race).
    pub(crate) fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// SIGTERM (a graceful stop), then waits up to 30 s for it to exit.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Only this test's own child, by its handle; SIGCONT first in case it is stopped.
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
