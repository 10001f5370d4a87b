//! Long-running tasks under a supervisor: a task that ends or panics is logged, counted in
//! `rtgate_task_restarts_total{task}` and started again with backoff, so that one fault never
//! leaves an instance silently delivering nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How a supervised task's run ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Its owner is gone (the broker was dropped, shutdown): do not restart.
    Done,
    /// It gave up: start it again.
    Failed,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Spawns `run()` under a supervisor named `task`. `on_fault` runs after every run that did not
/// end with [`Exit::Done`] (to mark the delivery path down, for example).
pub fn spawn<F, Fut>(task: &'static str, mut run: F, on_fault: impl Fn() + Send + 'static)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Exit> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = FIRST_RETRY;
        loop {
            let started = Instant::now();
            let outcome = tokio::spawn(run()).await;
            let why = match outcome {
                Ok(Exit::Done) => return,
                Ok(Exit::Failed) => "ended".to_string(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                Err(_) => return, // cancelled: the runtime is shutting down
            };
            on_fault();
            if started.elapsed() > HEALTHY_RUN {
                backoff = FIRST_RETRY;
            }
            crate::telemetry::metric::task_restart(task);
            tracing::error!(
                task,
                retry_in_ms = backoff.as_millis() as u64,
                "task {why}; restarting"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    });
}

/// Test-only fault injection: in debug builds started with `RTGATE_FAULT_INJECTION=1`, the
/// first message of the room `public:fault-panic` panics the task that receives it, once.
pub fn fault_point(room: &str) {
    if injected("panic", room) {
        panic!("injected fault (RTGATE_FAULT_INJECTION)");
    }
}

/// Test-only fault injection: true once, for the first message of the room (or, for
/// `cut-direct`, to the user) `public:fault-<fault>`, in debug builds started with
/// `RTGATE_FAULT_INJECTION=1`; always false in release builds. `deaf`: the Kafka consumer
/// stops reading (its probes then fail); `slow-index`: the occupancy index is written 3 s
/// late; `slow-presence`: a join's presence state is sent 1 s after it was read; `cut` and `cut-direct`: the Redis subscription is lost with a presence diff or a
/// direct message unread.
pub fn injected(fault: &str, room: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        use std::sync::{Mutex, OnceLock};
        static ENABLED: OnceLock<bool> = OnceLock::new();
        static FIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let enabled =
            *ENABLED.get_or_init(|| std::env::var("RTGATE_FAULT_INJECTION").as_deref() == Ok("1"));
        if !enabled || room.strip_prefix("public:fault-") != Some(fault) {
            return false;
        }
        let mut fired = FIRED.lock().unwrap_or_else(|p| p.into_inner());
        if fired.iter().any(|f| f == fault) {
            return false;
        }
        fired.push(fault.to_string());
        true
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = (fault, room);
        false
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "(no message)".to_string(),
        },
    }
}

/// A value a supervised task takes for one run and gives back when the run ends, even by a
/// panic (a command queue, for example): the next run finds it where it was.
pub struct Handoff<T>(Arc<Mutex<Option<T>>>);

impl<T> Clone for Handoff<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Handoff<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(Mutex::new(Some(value))))
    }

    /// Takes the value for one run; `None` if another run holds it.
    pub fn take(&self) -> Option<Held<T>> {
        let value = self.0.lock().take()?;
        Some(Held {
            slot: self.0.clone(),
            value: Some(value),
        })
    }
}

/// The value of a [`Handoff`] while a run holds it; given back on drop.
pub struct Held<T> {
    slot: Arc<Mutex<Option<T>>>,
    value: Option<T>,
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("held until dropped")
    }
}

impl<T> std::ops::DerefMut for Held<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("held until dropped")
    }
}

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        *self.slot.lock() = self.value.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_keeps_what_it_held() {
        let queue = Handoff::new(vec![1]);
        let runs = Arc::new(AtomicU32::new(0));
        let faults = Arc::new(AtomicU32::new(0));
        let (r, f, q) = (runs.clone(), faults.clone(), queue.clone());
        spawn(
            "test",
            move || {
                let (r, q) = (r.clone(), q.clone());
                async move {
                    let mut held = q.take().expect("the value is back");
                    held.push(2);
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("injected");
                    }
                    Exit::Done
                }
            },
            move || {
                f.fetch_add(1, Ordering::SeqCst);
            },
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "restarted twice");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(faults.load(Ordering::SeqCst), 2);
        assert_eq!(
            *queue.take().unwrap(),
            vec![1, 2, 2, 2],
            "kept across panics"
        );
    }
}
