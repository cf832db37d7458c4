//! A coordinator running in a task for a test, stopped through a oneshot.

use std::time::Duration;

use saga_core::{Coordinator, CoordinatorReport, Engine};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A [`Coordinator`] (4 workers, polling every 50 ms as a fallback) running `engine`'s sagas
/// until [`RunningCoordinator::stop`].
#[derive(Debug)]
pub struct RunningCoordinator {
    stop: oneshot::Sender<()>,
    task: JoinHandle<CoordinatorReport>,
}

impl RunningCoordinator {
    /// Starts it on the current runtime.
    #[must_use]
    pub fn spawn(engine: &Engine) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let coordinator = Coordinator::new(engine.clone())
            .workers(4)
            .poll_interval(Duration::from_millis(50));
        let task = tokio::spawn(coordinator.run(async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Asks it to stop and waits for its report.
    pub async fn stop(self) -> CoordinatorReport {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}
