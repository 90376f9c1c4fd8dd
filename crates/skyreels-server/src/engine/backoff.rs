//! How long to wait before trying again (a store that is away, a write that failed).

use std::time::Duration;

/// Exponential backoff from 100 ms to 5 s (reconnecting to a store, retrying a write).
#[derive(Default)]
pub struct Backoff(u32);

impl Backoff {
    pub fn reset(&mut self) {
        self.0 = 0;
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = Duration::from_millis(100 << self.0.min(6)).min(Duration::from_secs(5));
        self.0 += 1;
        d
    }

    /// Sleeps the next wait (worker threads).
    pub fn sleep(&mut self) {
        std::thread::sleep(self.next_delay());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
