//! `BlockingRuntime`: a small tokio runtime that synchronous code blocks
//! on, for the async clients the broker calls from threads that run no
//! runtime (signer threads, sink workers) and from inside the actix
//! system's runtime (start-up, verification), where blocking in place
//! panics. The AWS KMS client, the EVM anchor's chain client and the
//! PostgreSQL pool use it (the pool's writer lock runs on it in the
//! background).

use std::future::Future;

/// A runtime of one worker thread, shut down without waiting when dropped.
pub struct BlockingRuntime {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for BlockingRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockingRuntime(..)")
    }
}

impl Drop for BlockingRuntime {
    /// Without waiting: the owner may be dropped from async code (a failed
    /// start), where a runtime may not block to shut down.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl BlockingRuntime {
    /// A runtime whose worker thread is named `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Runs `task` in the background until it ends or the runtime is
    /// dropped.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().expect("until dropped").spawn(task)
    }

    /// Runs `work` to its end: on this thread when it runs no runtime,
    /// else on a scoped thread of its own.
    pub fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let runtime = self.runtime.as_ref().expect("until dropped");
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(work);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(work))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}
