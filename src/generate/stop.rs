//! Stop sequences: an answer ends before the first of them, and streamed text never shows part of
//! one (text that may be the start of a stop sequence is held back until it is known not to be).

/// Scans streamed text for stop sequences.
pub struct StopScan {
    stops: Vec<String>,
    held: String,
}

impl StopScan {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Add a piece of the answer. Returns the text that can be shown now and whether a stop
    /// sequence was reached (the answer ends with the returned text; stop generating).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_match(&self.held, s))
            .max()
            .unwrap_or(0);
        let out: String = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    /// The text held back when the answer ended without reaching a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest end of `text` that is a proper start of `stop`.
fn partial_match(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed pieces; the shown text and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut scan = StopScan::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = String::new();
        for p in pieces {
            let (out, stopped) = scan.push(p);
            shown.push_str(&out);
            if stopped {
                return (shown, true);
            }
        }
        shown.push_str(&scan.finish());
        (shown, false)
    }

    #[test]
    fn the_answer_ends_before_the_first_stop_sequence_even_across_pieces() {
        assert_eq!(
            run(&["\n"], &["red", " square\nmore"]),
            ("red square".into(), true)
        );
        assert_eq!(run(&["END"], &["a E", "N", "D b"]), ("a ".into(), true));
        // The earliest of several, whichever is listed first.
        assert_eq!(run(&["zz", "b"], &["abczz"]), ("a".into(), true));
        // A start of a stop sequence that does not complete is shown in the end.
        assert_eq!(run(&["END"], &["a EN", "x"]), ("a ENx".into(), false));
        assert_eq!(run(&["END"], &["a EN"]), ("a EN".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // Multi-byte characters are never split.
        assert_eq!(run(&["红色"], &["是红", "色的"]), ("是".into(), true));
        assert_eq!(run(&["红色"], &["是红", "的"]), ("是红的".into(), false));
    }

    #[test]
    fn text_that_may_start_a_stop_sequence_is_held_back_until_it_is_known() {
        let mut scan = StopScan::new(vec!["END".into()]);
        assert_eq!(scan.push("one E"), ("one ".into(), false));
        assert_eq!(scan.push("N"), (String::new(), false));
        assert_eq!(scan.push("X"), ("ENX".into(), false));
    }
}
