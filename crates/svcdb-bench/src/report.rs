//! What both benchmarks share for turning timings into figures: latency histograms, medians,
//! ratios against targets, a table for people and one JSON line for scripts.

use std::time::Duration;

use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use hdrhistogram::Histogram;
use serde_json::{Map, Value};

/// Latencies in microseconds. hdrhistogram keeps percentiles exact to 3 significant digits in
/// fixed memory, however many requests a run makes, and per-task histograms merge losslessly.
pub struct Latencies(Histogram<u64>);

/// Percentiles of a [`Latencies`], in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencySummary {
    /// Requests measured.
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn new() -> Self {
        // 1 µs .. 1 min: a request slower than a minute is a broken run, not a data point
        // (`saturating_record` clamps it rather than failing the benchmark).
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    /// Adds another task's latencies to these.
    pub fn merge(&mut self, other: &Self) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always merge");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| micros as f64 / 1e3;
        LatencySummary {
            count: self.0.len(),
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            mean_ms: self.0.mean() / 1e3,
            max_ms: ms(self.0.max()),
        }
    }
}

/// The median of `samples` (the mean of the middle two for an even count). Medians, not means,
/// for repeated short calls: one call that meets a checkpoint or a scheduler hiccup should not
/// move the figure.
pub fn median(samples: &[Duration]) -> Duration {
    let secs: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(median_f64(&secs))
}

/// The median of `values` (the mean of the middle two for an even count): ratios measured
/// once per round, and [`median`]'s durations.
pub fn median_f64(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of no values");
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Each round's `ours / theirs`, the two measured in that round back to back.
pub fn paired_ratios(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    ours.iter()
        .zip(theirs)
        .filter_map(|(o, t)| ratio(Some(*o), Some(*t)))
        .collect()
}

/// The median of [`paired_ratios`]: each ratio taken under its round's load, so a burst of
/// load elsewhere moves one round's ratio, not the result (a ratio of the two medians would
/// set one round's figure against another's). `None` without rounds.
pub fn paired_median(ours: &[f64], theirs: &[f64]) -> Option<f64> {
    let ratios = paired_ratios(ours, theirs);
    (!ratios.is_empty()).then(|| median_f64(&ratios))
}

/// The item whose `key` is the median (the lower middle for an even count), whole: one
/// round's figures reported together rather than medians taken field by field.
pub fn median_by<T>(items: &[T], key: impl Fn(&T) -> f64) -> &T {
    assert!(!items.is_empty(), "median of no items");
    let mut order: Vec<&T> = items.iter().collect();
    order.sort_unstable_by(|a, b| key(a).total_cmp(&key(b)));
    order[(order.len() - 1) / 2]
}

/// CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The 1-minute load average (Linux), recorded with the figures: on a shared machine a
/// concurrent build or test run moves every timing, and this says whether one was running.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the figures were measured on, taken when a benchmark starts.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub load_average: Option<f64>,
    pub server_version: String,
}

impl Machine {
    /// Takes the machine's state, warning on stderr when other work is already running.
    pub fn now(server_version: &str) -> Self {
        let machine = Self {
            cpus: cpus(),
            load_average: load_average(),
            server_version: server_version.to_owned(),
        };
        if let Some(load) = machine.load_average.filter(|&l| l > 0.5) {
            eprintln!(
                "warning: load average {load:.2} before starting: something else is running \
                 (a build, tests?), and the figures will carry its noise"
            );
        }
        machine
    }

    /// `2 CPUs, load average 0.12 at start; PostgreSQL 15.20 (…)`.
    pub fn line(&self) -> String {
        let load = self
            .load_average
            .map_or_else(|| "unknown".to_owned(), |l| format!("{l:.2}"));
        format!(
            "{} CPUs, load average {load} at start; PostgreSQL {}",
            self.cpus, self.server_version
        )
    }

    pub fn add_to(&self, figures: &mut Figures) {
        figures.set("cpus", self.cpus);
        figures.set("load_average_1m", self.load_average);
        figures.set("server_version", self.server_version.as_str());
    }
}

/// CPU time used so far, user and system together.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    /// By this process, all threads.
    pub own: Duration,
    /// By its children that have exited and been waited for (pgbench).
    pub children: Duration,
    /// Idle time of the whole machine, summed over its CPUs (`/proc/stat`'s idle and iowait):
    /// CPU that neither client nor server used.
    pub machine_idle: Duration,
}

impl CpuTimes {
    /// The share of the machine's CPU time left idle between `self` and `later`, `elapsed`
    /// apart, in percent.
    pub fn idle_percent(&self, later: &CpuTimes, elapsed: Duration) -> f64 {
        let capacity = elapsed.as_secs_f64() * cpus() as f64;
        (later.machine_idle - self.machine_idle).as_secs_f64() / capacity * 100.0
    }
}

/// Reads [`CpuTimes`] from `/proc/self/stat` and `/proc/stat` (Linux; `None` elsewhere). The
/// kernel counts in clock ticks of 1/100 s (`USER_HZ`), fine enough over runs of seconds.
pub fn cpu_times() -> Option<CpuTimes> {
    const TICK: Duration = Duration::from_millis(10);
    let ticks = |n: u64| TICK * u32::try_from(n).unwrap_or(u32::MAX);
    // The first line sums all CPUs: `cpu user nice system idle iowait irq softirq …`.
    let machine = std::fs::read_to_string("/proc/stat").ok()?;
    let totals: Vec<u64> = machine
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(5)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let machine_idle = match totals[..] {
        [_, _, _, idle, iowait] => ticks(idle + iowait),
        _ => return None,
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces; the first
    // of them is field 3 (state), so utime (14), stime, cutime, cstime (17) are 11..=14.
    let fields: Vec<u64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match fields[..] {
        [utime, stime, cutime, cstime] => Some(CpuTimes {
            own: ticks(utime + stime),
            children: ticks(cutime + cstime),
            machine_idle,
        }),
        _ => None,
    }
}

/// Milliseconds as a float, the unit of every latency figure.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `numerator / denominator`, or `None` when either is missing or the denominator is zero.
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// Which side of its bound a figure must be on.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// A figure with the target it is held to, e.g. "pooled / pgbench at 8 clients ≥ 0.9×".
#[derive(Debug, Clone)]
pub struct Target {
    /// A short key for the JSON `targets_met` object.
    pub key: String,
    /// What is measured, for people.
    pub what: String,
    /// The measured value; `None` when it could not be measured (e.g. no pgbench).
    pub value: Option<f64>,
    pub bound: Bound,
    /// Printed after the value and the bound: `×`, ` ms`.
    pub unit: &'static str,
}

impl Target {
    /// Whether the target is met; `None` when the figure is missing.
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| match self.bound {
            Bound::AtLeast(b) => v >= b,
            Bound::AtMost(b) => v <= b,
        })
    }

    /// `pooled / pgbench -S, 8 clients: 0.95× (target ≥ 0.9×): met`.
    pub fn line(&self) -> String {
        let (op, bound) = match self.bound {
            Bound::AtLeast(b) => ("≥", b),
            Bound::AtMost(b) => ("≤", b),
        };
        let value = self
            .value
            .map_or_else(|| "n/a".to_owned(), |v| format!("{}{}", num(v), self.unit));
        let verdict = match self.met() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        format!(
            "{}: {value} (target {op} {}{}): {verdict}",
            self.what,
            num(bound),
            self.unit
        )
    }
}

/// A number for people: 3 significant digits below 100, whole numbers above.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A table whose first column is text and the others numbers (right-aligned). Markdown-shaped,
/// so a run's output pastes straight into `docs/benchmarks.md`.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_MARKDOWN)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(Cell::new));
    for i in 1..header.len() {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// The figures of one run, for the JSON line.
#[derive(Debug, Default)]
pub struct Figures(Map<String, Value>);

impl Figures {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key`; floats are rounded to 4 decimals, which keeps every figure's meaningful
    /// digits without printing timer noise.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.0.insert(key.into(), rounded(value.into()));
    }

    /// Records each target's verdict under `targets_met.<key>` (`null`: not measured).
    pub fn set_targets(&mut self, targets: &[Target]) {
        let verdicts: Map<String, Value> = targets
            .iter()
            .map(|t| (t.key.clone(), t.met().map_or(Value::Null, Value::Bool)))
            .collect();
        self.0.insert("targets_met".into(), Value::Object(verdicts));
    }

    /// The whole object on one line.
    pub fn to_json_line(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }
}

/// `value` with every float (in arrays too) rounded to 4 decimals.
fn rounded(value: Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .map(|f| (f * 1e4).round() / 1e4)
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(rounded).collect()),
        other => other,
    }
}

/// Prints the report for people, then (with `json`) the figures as the last line of stdout, so
/// a script can take `tail -n 1` whatever the report above looks like.
pub fn print(report: &str, figures: &Figures, targets: &[Target], json: bool) {
    println!("{report}");
    if !targets.is_empty() {
        println!();
        println!("Targets:");
        for target in targets {
            println!("  {}", target.line());
        }
    }
    if json {
        println!("{}", figures.to_json_line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_merged_histograms() {
        let mut a = Latencies::new();
        let mut b = Latencies::new();
        for i in 1..=50 {
            a.record(Duration::from_micros(i * 10));
            b.record(Duration::from_micros((i + 50) * 10));
        }
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 0.5).abs() < 0.001, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.001, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let d = Duration::from_millis;
        assert_eq!(median(&[d(9), d(1), d(5)]), d(5));
        assert_eq!(median(&[d(4), d(1), d(2), d(100)]), d(3));
    }

    #[test]
    fn targets_say_met_not_met_or_not_measured() {
        let mut t = Target {
            key: "k".into(),
            what: "pooled / pgbench".into(),
            value: Some(0.95),
            bound: Bound::AtLeast(0.9),
            unit: "×",
        };
        assert_eq!(t.met(), Some(true));
        assert_eq!(t.line(), "pooled / pgbench: 0.950× (target ≥ 0.900×): met");
        t.bound = Bound::AtMost(0.5);
        assert_eq!(t.met(), Some(false));
        t.value = None;
        assert_eq!(t.met(), None);
        assert!(t.line().ends_with("not measured"));
    }

    #[test]
    fn json_rounds_floats_and_keeps_nulls() {
        let mut f = Figures::new();
        f.set("tps", 1_234.567_891);
        f.set("missing", Option::<f64>::None);
        f.set("count", 300);
        f.set("rounds", vec![0.123_456_78, 2.0]);
        let line = f.to_json_line();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            serde_json::json!({"tps": 1234.5679, "missing": null, "count": 300, "rounds": [0.1235, 2.0]})
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_times_come_from_proc() {
        let before = cpu_times().expect("/proc/self/stat is readable");
        let started = std::time::Instant::now();
        let mut x = 0_u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_times().unwrap();
        assert!(after.own > before.own, "{before:?} → {after:?}");
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(10.0), Some(4.0)), Some(2.5));
        assert_eq!(ratio(Some(10.0), None), None);
        assert_eq!(ratio(Some(10.0), Some(0.0)), None);
    }
}
