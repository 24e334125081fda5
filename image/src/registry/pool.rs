//! The worker pool of registry transfers: up to `workers` threads take items off one queue;
//! the first error stops the others from taking more, and is returned.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Runs `work` on every item of `items` with at most `workers` threads (at least one, never
/// more than there are items). Items already taken finish; none is started after a failure.
pub(super) fn run<T: Send, E: Send>(
    items: VecDeque<T>,
    workers: usize,
    work: impl Fn(T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let workers = workers.max(1).min(items.len());
    let queue = Mutex::new(items);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(item) = queue.lock().expect("queue lock").pop_front() else { break };
                    if let Err(e) = work(item) {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().expect("error lock").get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().expect("error lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn every_item_once_with_at_most_the_workers() {
        let busy = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let done = Mutex::new(Vec::new());
        let r: Result<(), ()> = run((0..40).collect(), 3, |i| {
            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            done.lock().unwrap().push(i);
            busy.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        });
        assert!(r.is_ok());
        let mut done = done.into_inner().unwrap();
        done.sort_unstable();
        assert_eq!(done, (0..40).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= 3);
        assert_eq!(run(VecDeque::<u8>::new(), 3, |_| Err("never")), Ok(()));
    }

    #[test]
    fn the_first_error_stops_the_rest() {
        let started = AtomicUsize::new(0);
        let r = run((0..100).collect(), 1, |i: u32| {
            started.fetch_add(1, Ordering::SeqCst);
            if i == 4 {
                Err(format!("item {i}"))
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("item 4".to_string()));
        assert_eq!(started.load(Ordering::SeqCst), 5, "one worker takes nothing after the failure");
    }
}
