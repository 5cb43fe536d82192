//! The queue model: a FIFO request queue on the broker, worker pods that each run up to `prefetch` requests at
//! once, a pod start delay, and a scaling policy that looks at the broker the way the management API shows it.
//!
//! Event-driven, in integer microseconds so that runs are exactly reproducible. Each pod is `prefetch` independent
//! handler slots (a CPU-bound handler on `prefetch` cores, or any handler whose concurrency is the prefetch): the
//! broker delivers a request to a pod with a free slot, which starts serving it at once, so the queue wait is the
//! time from publish to delivery, and one pod completes `prefetch / mean service time` requests per second.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use serde::Serialize;

use super::trace::{Request, Trace};
use warren_autoscale::{QueueSample, ReplicaCounts};

/// A scaling policy as the simulator drives it.
pub trait ScalingPolicy {
    /// When it next wants to look (seconds).
    fn next_tick(&self) -> f64;
    /// Looks at the queue and the pods; returns the replicas it asks for, if it asks.
    fn tick(&mut self, now: f64, sample: QueueSample, replicas: ReplicaCounts) -> Option<i32>;
}

/// The parts of the world that are the same for every policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cluster {
    /// Requests one pod runs at once (= the worker prefetch).
    pub prefetch: u32,
    /// Seconds from a pod's creation to its first delivery (scheduling, image, start, connect).
    pub pod_start_delay: f64,
    /// The queue delay a request should not exceed (seconds): what `over_target_fraction` counts.
    pub target_queue_delay: f64,
}

/// How a run went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub requests: u64,
    /// Share of requests whose wait (publish → start of service) exceeded the target delay.
    pub over_target_fraction: f64,
    pub p99_wait_seconds: f64,
    /// Pod-seconds paid for, from creation to termination (starting and draining included).
    pub replica_seconds: f64,
    /// Times the replica count was changed.
    pub scale_events: u64,
}

/// The state of the run once per `timeline_step`, for plots.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    pub t: f64,
    pub arrival_rate: f64,
    pub backlog: u64,
    pub in_flight: u64,
    pub replicas: i32,
    pub ready_replicas: i32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PodState {
    Starting,
    Running,
    Draining,
    Gone,
}

struct Pod {
    state: PodState,
    busy: u32,
}

/// Heap events at the same instant: completions first, then pods becoming ready.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EventKind {
    Completion,
    PodReady,
}

type Micros = u64;

fn micros(seconds: f64) -> Micros {
    (seconds.max(0.0) * 1e6).round() as Micros
}

fn seconds(t: Micros) -> f64 {
    t as f64 / 1e6
}

struct World<'a> {
    cluster: Cluster,
    requests: &'a [Request],
    now: Micros,
    next_arrival: usize,
    queue: VecDeque<u32>,
    pods: Vec<Pod>,
    /// One entry per free handler slot; entries of pods that stopped running are skipped when popped.
    free_slots: Vec<u32>,
    events: BinaryHeap<Reverse<(Micros, EventKind, u32)>>,
    /// Pods not yet ready, oldest first.
    starting: VecDeque<u32>,
    /// Ready pods, in the order they became ready.
    running: Vec<u32>,
    /// Pods that exist (starting, running, draining): what is paid for.
    live: u64,
    in_flight: u64,
    published: u64,
    acked: u64,
    waits: Vec<f32>,
    pod_micros: u128,
    scale_events: u64,
}

impl<'a> World<'a> {
    fn new(cluster: Cluster, requests: &'a [Request], initial_replicas: i32) -> Self {
        let mut world = World {
            cluster,
            requests,
            now: 0,
            next_arrival: 0,
            queue: VecDeque::new(),
            pods: Vec::new(),
            free_slots: Vec::new(),
            events: BinaryHeap::new(),
            starting: VecDeque::new(),
            running: Vec::new(),
            live: 0,
            in_flight: 0,
            published: 0,
            acked: 0,
            waits: Vec::with_capacity(requests.len()),
            pod_micros: 0,
            scale_events: 0,
        };
        for _ in 0..initial_replicas.max(0) {
            let id = world.pods.len() as u32;
            world.pods.push(Pod { state: PodState::Running, busy: 0 });
            world.running.push(id);
            world.free_slots.extend(std::iter::repeat_n(id, cluster.prefetch as usize));
            world.live += 1;
        }
        world
    }

    fn advance(&mut self, to: Micros) {
        self.pod_micros += self.live as u128 * (to - self.now) as u128;
        self.now = to;
    }

    fn target(&self) -> i32 {
        (self.starting.len() + self.running.len()) as i32
    }

    fn sample(&self) -> QueueSample {
        QueueSample {
            at: seconds(self.now),
            ready: self.queue.len() as u64,
            unacked: self.in_flight,
            consumers: self.running.len() as u64,
            published_total: self.published,
            acked_total: self.acked,
        }
    }

    fn pop_free_slot(&mut self) -> Option<u32> {
        while let Some(pod) = self.free_slots.pop() {
            if self.pods[pod as usize].state == PodState::Running {
                return Some(pod);
            }
        }
        None
    }

    fn start(&mut self, request: u32, pod: u32) {
        let r = self.requests[request as usize];
        self.waits.push((seconds(self.now) - r.arrival).max(0.0) as f32);
        self.pods[pod as usize].busy += 1;
        self.in_flight += 1;
        self.events.push(Reverse((self.now + micros(r.service).max(1), EventKind::Completion, pod)));
    }

    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(pod) = self.pop_free_slot() else { return };
            let request = self.queue.pop_front().expect("queue is not empty");
            self.start(request, pod);
        }
    }

    fn arrive(&mut self) {
        self.queue.push_back(self.next_arrival as u32);
        self.next_arrival += 1;
        self.published += 1;
        self.dispatch();
    }

    fn handle(&mut self, kind: EventKind, pod: u32) {
        match kind {
            EventKind::Completion => {
                self.acked += 1;
                self.in_flight -= 1;
                let p = &mut self.pods[pod as usize];
                p.busy -= 1;
                match p.state {
                    PodState::Running => {
                        self.free_slots.push(pod);
                        self.dispatch();
                    }
                    PodState::Draining if p.busy == 0 => {
                        p.state = PodState::Gone;
                        self.live -= 1;
                    }
                    _ => {}
                }
            }
            EventKind::PodReady => {
                if self.pods[pod as usize].state != PodState::Starting {
                    return; // deleted while starting
                }
                self.pods[pod as usize].state = PodState::Running;
                self.starting.retain(|p| *p != pod);
                self.running.push(pod);
                self.free_slots.extend(std::iter::repeat_n(pod, self.cluster.prefetch as usize));
                self.dispatch();
            }
        }
    }

    /// Sets the Deployment's replicas: new pods start, removed ones are the least advanced (like a ReplicaSet:
    /// not-ready pods first, then the most recently ready), and finish their in-flight requests before leaving.
    fn scale_to(&mut self, replicas: i32) {
        let replicas = replicas.max(0);
        let current = self.target();
        if replicas == current {
            return;
        }
        self.scale_events += 1;
        for _ in current..replicas {
            let id = self.pods.len() as u32;
            self.pods.push(Pod { state: PodState::Starting, busy: 0 });
            self.starting.push_back(id);
            self.live += 1;
            self.events.push(Reverse((self.now + micros(self.cluster.pod_start_delay), EventKind::PodReady, id)));
        }
        for _ in replicas..current {
            if let Some(id) = self.starting.pop_back() {
                self.pods[id as usize].state = PodState::Gone;
                self.live -= 1;
            } else if let Some(id) = self.running.pop() {
                let pod = &mut self.pods[id as usize];
                if pod.busy == 0 {
                    pod.state = PodState::Gone;
                    self.live -= 1;
                } else {
                    pod.state = PodState::Draining;
                }
            }
        }
    }

    fn point(&self, trace: &Trace) -> TimelinePoint {
        let t = seconds(self.now);
        TimelinePoint {
            t,
            arrival_rate: trace.rate_at(t),
            backlog: self.queue.len() as u64,
            in_flight: self.in_flight,
            replicas: self.target(),
            ready_replicas: self.running.len() as i32,
        }
    }
}

/// Runs `requests` of `trace` through the cluster under `policy`, starting with `initial_replicas` ready pods.
/// With `timeline`, records a point every `timeline_step` seconds.
pub fn run(
    trace: &Trace,
    requests: &[Request],
    cluster: Cluster,
    initial_replicas: i32,
    policy: &mut dyn ScalingPolicy,
    mut timeline: Option<(&mut Vec<TimelinePoint>, f64)>,
) -> Outcome {
    let end = micros(trace.duration);
    let mut world = World::new(cluster, requests, initial_replicas);
    let mut next_point = 0;
    loop {
        let heap = world.events.peek().map(|Reverse((t, _, _))| *t).unwrap_or(Micros::MAX);
        let arrival = requests.get(world.next_arrival).map_or(Micros::MAX, |r| micros(r.arrival));
        let tick = micros(policy.next_tick());
        let point = if timeline.is_some() { next_point } else { Micros::MAX };
        // Ties: events, then arrivals, then the policy (it sees the instant settled), then the timeline.
        let t = heap.min(arrival).min(tick).min(point);
        if t >= end {
            world.advance(end);
            break;
        }
        world.advance(t);
        if heap == t {
            let Reverse((_, kind, pod)) = world.events.pop().expect("peeked");
            world.handle(kind, pod);
        } else if arrival == t {
            world.arrive();
        } else if tick == t {
            let replicas = ReplicaCounts { current: world.target(), ready: world.running.len() as i32 };
            if let Some(desired) = policy.tick(seconds(t), world.sample(), replicas) {
                world.scale_to(desired);
            }
            assert!(micros(policy.next_tick()) > t, "a policy must move its next tick past {}s", seconds(t));
        } else if let Some((points, step)) = timeline.as_mut() {
            points.push(world.point(trace));
            next_point = micros(seconds(next_point) + *step);
        }
    }
    // Requests still waiting at the end count with the wait they have had so far.
    let end_seconds = seconds(end);
    let still_waiting: Vec<f32> =
        world.queue.iter().map(|r| (end_seconds - requests[*r as usize].arrival) as f32).collect();
    world.waits.extend(still_waiting);
    summarize(world.waits, cluster.target_queue_delay, world.pod_micros, world.scale_events)
}

fn summarize(mut waits: Vec<f32>, target: f64, pod_micros: u128, scale_events: u64) -> Outcome {
    let requests = waits.len() as u64;
    let over = waits.iter().filter(|w| f64::from(**w) > target).count() as f64;
    let p99 = if waits.is_empty() {
        0.0
    } else {
        let rank = ((waits.len() as f64 * 0.99).ceil() as usize).clamp(1, waits.len()) - 1;
        let (_, p, _) = waits.select_nth_unstable_by(rank, f32::total_cmp);
        f64::from(*p)
    };
    Outcome {
        requests,
        over_target_fraction: if requests == 0 { 0.0 } else { over / requests as f64 },
        p99_wait_seconds: p99,
        replica_seconds: pod_micros as f64 / 1e6,
        scale_events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::trace::ServiceTime;

    struct Fixed {
        replicas: i32,
        next: f64,
    }

    impl ScalingPolicy for Fixed {
        fn next_tick(&self) -> f64 {
            self.next
        }
        fn tick(&mut self, _now: f64, _sample: QueueSample, _replicas: ReplicaCounts) -> Option<i32> {
            self.next = f64::INFINITY;
            Some(self.replicas)
        }
    }

    fn cluster() -> Cluster {
        Cluster { prefetch: 4, pod_start_delay: 10.0, target_queue_delay: 2.0 }
    }

    #[test]
    fn enough_pods_keep_waits_short_and_are_paid_for_the_whole_run() {
        let trace = Trace::named("noisy", 1).unwrap();
        let requests = trace.requests(&ServiceTime { mean_seconds: 0.2, sigma: 0.5 }, 1);
        let mut policy = Fixed { replicas: 12, next: f64::INFINITY };
        let o = run(&trace, &requests, cluster(), 12, &mut policy, None);
        assert_eq!(o.requests, requests.len() as u64);
        assert!(o.over_target_fraction < 0.001, "{o:?}");
        assert!((o.replica_seconds - 12.0 * trace.duration).abs() < 1e-6);
        assert_eq!(o.scale_events, 0);
    }

    #[test]
    fn too_few_pods_build_a_backlog() {
        let trace = Trace::named("noisy", 1).unwrap();
        let requests = trace.requests(&ServiceTime { mean_seconds: 0.2, sigma: 0.5 }, 1);
        let mut policy = Fixed { replicas: 4, next: f64::INFINITY };
        let o = run(&trace, &requests, cluster(), 4, &mut policy, None);
        assert!(o.over_target_fraction > 0.9, "80 req/s of capacity for 120 req/s: {o:?}");
    }

    #[test]
    fn new_pods_serve_after_the_start_delay_and_are_counted_while_starting() {
        let trace = Trace::named("sparse", 1).unwrap();
        let requests = trace.requests(&ServiceTime { mean_seconds: 0.2, sigma: 0.5 }, 1);
        let mut policy = Fixed { replicas: 1, next: 100.0 };
        let mut points = Vec::new();
        let o = run(&trace, &requests, cluster(), 0, &mut policy, Some((&mut points, 1.0)));
        assert_eq!(o.scale_events, 1);
        assert!((o.replica_seconds - (trace.duration - 100.0)).abs() < 1e-6);
        let at = |t: f64| points.iter().find(|p| p.t == t).unwrap();
        assert_eq!((at(105.0).replicas, at(105.0).ready_replicas), (1, 0));
        assert_eq!((at(111.0).replicas, at(111.0).ready_replicas), (1, 1));
    }
}
