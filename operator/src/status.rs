//! Conditions in the metav1.Condition shape, merged so that `lastTransitionTime` only moves when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const QUEUE_READY: &str = "QueueReady";
pub const WORKERS_READY: &str = "WorkersReady";
pub const SCALING: &str = "Scaling";

/// A condition as the reconciler decides it, before timestamps.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// Merges `updates` into `existing`: a condition whose status did not change keeps its `lastTransitionTime`.
/// Conditions not named in `updates` are kept as they are.
pub fn merge_conditions(
    existing: &[Condition],
    updates: &[ConditionUpdate],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing.to_vec();
    for update in updates {
        let status = if update.status { "True" } else { "False" }.to_owned();
        let fresh = Condition {
            type_: update.type_.to_owned(),
            status: status.clone(),
            reason: update.reason.clone(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time: now.clone(),
        };
        match merged.iter_mut().find(|c| c.type_ == update.type_) {
            Some(current) => {
                let since = if current.status == status { current.last_transition_time.clone() } else { now.clone() };
                *current = Condition { last_transition_time: since, ..fresh };
            }
            None => merged.push(fresh),
        }
    }
    merged
}

/// `Ready` from the other conditions: true when the queue and the workers are.
pub fn ready_condition(queue: &ConditionUpdate, workers: &ConditionUpdate) -> ConditionUpdate {
    match (queue.status, workers.status) {
        (true, true) => ConditionUpdate::new(READY, true, "Ready", "the queue is declared and the workers are ready"),
        (false, _) => ConditionUpdate::new(READY, false, queue.reason.clone(), queue.message.clone()),
        (true, false) => ConditionUpdate::new(READY, false, workers.reason.clone(), workers.message.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first =
            merge_conditions(&[], &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "ok")], Some(1), &at(10));
        let same = merge_conditions(
            &first,
            &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "ok again")],
            Some(2),
            &at(20),
        );
        assert_eq!(same[0].last_transition_time, at(10));
        assert_eq!(same[0].message, "ok again");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(
            &same,
            &[ConditionUpdate::new(QUEUE_READY, false, "BrokerUnavailable", "down")],
            Some(2),
            &at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped[0].status, "False");
    }

    #[test]
    fn conditions_not_updated_are_kept() {
        let first = merge_conditions(&[], &[ConditionUpdate::new(SCALING, true, "Steady", "")], Some(1), &at(1));
        let next =
            merge_conditions(&first, &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "")], Some(1), &at(2));
        assert_eq!(next.len(), 2);
    }

    #[test]
    fn ready_reports_the_first_failing_part() {
        let q = ConditionUpdate::new(QUEUE_READY, false, "QueueConflict", "x-max-length differs");
        let w = ConditionUpdate::new(WORKERS_READY, true, "AllReplicasReady", "");
        let r = ready_condition(&q, &w);
        assert!(!r.status);
        assert_eq!(r.reason, "QueueConflict");
    }
}
