//! A saga's steps in causal order: every step after the step that caused it, and among the steps
//! whose causes are placed, the earliest first. Causation comes first because the services'
//! clocks differ: an effect stamped a few milliseconds before its cause is still shown after it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::step::{Kind, Step};

/// Orders `steps` causally (see the module's documentation). A step whose cause is not among
/// them (an HTTP-originated event, a record produced by hand, a cause already pruned) is a root;
/// so is one of a loop of causes (forged headers), at its place in time. Ties in time go by
/// topic, partition and offset, so the order is the same however the steps were read.
pub fn order(mut steps: Vec<Step>) -> Vec<Step> {
    steps.sort_by(|a, b| key(a).cmp(&key(b)));
    // The event each message id names: the first of its event steps (a retry copy or a dead
    // letter carries the same id, but is never the cause of anything).
    let mut events: HashMap<uuid::Uuid, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if let (Kind::Event, Some(id)) = (s.kind, s.message_id) {
            events.entry(id).or_insert(i);
        }
    }
    let cause_of: Vec<Option<usize>> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.causation_id
                .and_then(|c| events.get(&c).copied())
                .filter(|&c| c != i)
        })
        .collect();
    let mut effects: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, cause) in cause_of.iter().enumerate() {
        if let Some(c) = cause {
            effects[*c].push(i);
        }
    }
    // Steps are sorted by key, so an index orders as its key does.
    let mut ready: BinaryHeap<Reverse<usize>> = (0..steps.len())
        .filter(|&i| cause_of[i].is_none())
        .map(Reverse)
        .collect();
    let mut placed = vec![false; steps.len()];
    let mut order = Vec::with_capacity(steps.len());
    let mut next_unplaced = 0;
    while order.len() < steps.len() {
        let i = match ready.pop() {
            Some(Reverse(i)) if placed[i] => continue,
            Some(Reverse(i)) => i,
            // Every step left waits for a cause that is not placed: follow the causes from the
            // earliest of them to a loop, and place the loop's earliest step.
            None => {
                while placed[next_unplaced] {
                    next_unplaced += 1;
                }
                let mut seen = vec![false; steps.len()];
                let mut i = next_unplaced;
                while !seen[i] {
                    seen[i] = true;
                    i = cause_of[i].expect("a step that is not ready waits for its cause");
                }
                let mut earliest = i;
                let mut j = cause_of[i].expect("a step on a loop has a cause");
                while j != i {
                    earliest = earliest.min(j);
                    j = cause_of[j].expect("a step on a loop has a cause");
                }
                earliest
            }
        };
        placed[i] = true;
        order.push(i);
        for &e in &effects[i] {
            if !placed[e] {
                ready.push(Reverse(e));
            }
        }
    }
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|i| slots[i].take().expect("each step is placed once"))
        .collect()
}

fn key(s: &Step) -> (i64, &str, i32, i64) {
    (s.at_ms, s.topic.as_str(), s.partition, s.offset)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use uuid::Uuid;

    pub(crate) fn step(n: u128, at_ms: i64, cause: Option<u128>, kind: Kind) -> Step {
        Step {
            order_id: Uuid::from_u128(1),
            at_ms,
            service: "order-service".into(),
            event_type: Some(format!("E{n}")),
            kind,
            topic: match kind {
                Kind::Event => "orders.v1".into(),
                Kind::Retry => "inventory-service.retry.1".into(),
                Kind::DeadLetter => "inventory-service.dlq".into(),
            },
            partition: 0,
            offset: n as i64,
            message_id: Some(Uuid::from_u128(n)),
            causation_id: cause.map(Uuid::from_u128),
            trace_id: None,
            note: None,
            decoded: true,
        }
    }

    fn names(steps: &[Step]) -> Vec<u128> {
        steps
            .iter()
            .map(|s| s.message_id.unwrap().as_u128() * 10 + s.kind as u128)
            .collect()
    }

    #[test]
    fn an_effect_stamped_before_its_cause_still_comes_after_it() {
        // 2 was caused by 1 but its service's clock is 50 ms behind; 3 comes later, uncaused.
        let steps = vec![
            step(3, 1_030, None, Kind::Event),
            step(2, 950, Some(1), Kind::Event),
            step(1, 1_000, None, Kind::Event),
        ];
        assert_eq!(names(&order(steps)), vec![10, 20, 30]);
    }

    #[test]
    fn among_steps_whose_causes_are_placed_the_earliest_goes_first() {
        let steps = vec![
            step(1, 100, None, Kind::Event),
            step(2, 300, Some(1), Kind::Event),
            step(3, 200, Some(1), Kind::Event),
            step(4, 250, None, Kind::Event),
            step(1, 220, None, Kind::Retry),
            step(1, 400, None, Kind::DeadLetter),
        ];
        let mut steps = steps;
        // Retry copies and dead letters are caused by the event they copy.
        steps[4].causation_id = Some(Uuid::from_u128(1));
        steps[5].causation_id = Some(Uuid::from_u128(1));
        assert_eq!(names(&order(steps)), vec![10, 30, 11, 40, 20, 12]);
    }

    #[test]
    fn causes_outside_the_saga_and_loops_of_causes_still_place_every_step_once() {
        let steps = vec![
            // A cause no step of this saga is (an HTTP request, a pruned step).
            step(1, 500, Some(99), Kind::Event),
            // A loop: 2 caused by 3, 3 caused by 2; and 4 caused by itself.
            step(2, 100, Some(3), Kind::Event),
            step(3, 200, Some(2), Kind::Event),
            step(4, 50, Some(4), Kind::Event),
            // Caused by a member of the loop.
            step(5, 10, Some(3), Kind::Event),
        ];
        // The roots first (4, whose cause is itself, and 1); then the loop from its earliest
        // step, and what it caused after it.
        assert_eq!(names(&order(steps)), vec![40, 10, 20, 30, 50]);
    }

    #[test]
    fn the_order_does_not_depend_on_the_order_steps_were_read_in() {
        let steps: Vec<Step> = (1..=30)
            .map(|n| {
                let cause = (n > 1).then_some(n / 2);
                step(n, 1_000 - (n as i64 % 7) * 10, cause, Kind::Event)
            })
            .collect();
        let forward = order(steps.clone());
        let mut reversed = steps;
        reversed.reverse();
        assert_eq!(order(reversed), forward);
        let position = |id: u128| {
            forward
                .iter()
                .position(|s| s.message_id == Some(Uuid::from_u128(id)))
                .unwrap()
        };
        for n in 2..=30 {
            assert!(position(n / 2) < position(n), "{n} after its cause");
        }
    }
}
