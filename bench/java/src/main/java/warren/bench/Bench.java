package warren.bench;

import com.sun.management.OperatingSystemMXBean;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * The Java peers of scripts/bench-rpc. Responders run until killed; callers run a closed loop (each of N callers
 * sends its next call when its reply arrives) and print one JSON object shaped like `warren bench --json`.
 *
 * <pre>
 *   java-rpc-server   QUEUE quorum|classic PREFETCH    RpcServer (com.rabbitmq:amqp-client)
 *   java-rpc-client   QUEUE SECONDS WARMUP N         one RpcClient (direct reply-to) shared by N threads
 *   spring-server     QUEUE quorum|classic PREFETCH    DirectMessageListenerContainer + MessageListenerAdapter
 *   spring-client     QUEUE SECONDS WARMUP N         RabbitTemplate.convertSendAndReceive from N threads
 *   spring-async-client QUEUE SECONDS WARMUP N       AsyncRabbitTemplate, N calls in flight
 * </pre>
 */
public final class Bench {
  /** The payload every peer echoes: the JSON array [1,2]. */
  static final byte[] PAYLOAD = "[1,2]".getBytes(StandardCharsets.UTF_8);

  static String brokerUri() {
    return System.getenv().getOrDefault("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f");
  }

  public static void main(String[] args) throws Exception {
    String command = args.length > 0 ? args[0] : "";
    String[] rest = Arrays.copyOfRange(args, Math.min(1, args.length), args.length);
    switch (command) {
      case "java-rpc-server" -> JavaRpcPeer.server(rest[0], rest[1], Integer.parseInt(rest[2]));
      case "java-rpc-client" -> print(JavaRpcPeer.client(rest[0], loop(rest)));
      case "spring-server" -> SpringPeer.server(rest[0], rest[1], Integer.parseInt(rest[2]));
      case "spring-client" -> print(SpringPeer.client(rest[0], loop(rest)));
      case "spring-async-client" -> print(SpringPeer.asyncClient(rest[0], loop(rest)));
      default -> {
        System.err.println("usage: see warren.bench.Bench");
        System.exit(2);
      }
    }
    System.exit(0); // client libraries leave non-daemon threads behind
  }

  static Loop loop(String[] rest) {
    return new Loop(Double.parseDouble(rest[1]), Double.parseDouble(rest[2]), Integer.parseInt(rest[3]));
  }

  static void print(String json) {
    System.out.println(json);
    System.out.flush();
  }

  /** A blocking call: returns the reply body. */
  interface Call {
    byte[] call() throws Exception;
  }

  /** The closed loop and what it measures. */
  static final class Loop {
    final int concurrency;
    private final double seconds, warmup;
    private long from, until;
    private long[] latenciesNs = new long[1 << 16];
    private int count;
    private long last;
    private final Map<String, Integer> errors = new TreeMap<>();
    private long cpuFrom = -1, cpuUntil = -1;

    Loop(double seconds, double warmup, int concurrency) {
      this.concurrency = concurrency;
      this.seconds = seconds;
      this.warmup = warmup;
    }

    /** The clock starts with the first call, once the client is connected (a cold JVM takes seconds to get there). */
    private synchronized void begin() {
      from = System.nanoTime() + (long) (warmup * 1e9);
      until = from + (long) (seconds * 1e9);
    }

    synchronized void record(long sent, long done, Throwable error, byte[] reply) {
      if (error == null && !Arrays.equals(reply, PAYLOAD)) {
        error = new IllegalStateException("wrong reply");
      }
      if (error != null) {
        errors.merge(error.getClass().getSimpleName(), 1, Integer::sum);
        return;
      }
      if (sent < from) {
        return;
      }
      if (count == latenciesNs.length) {
        latenciesNs = Arrays.copyOf(latenciesNs, count * 2);
      }
      latenciesNs[count++] = done - sent;
      last = Math.max(last, done);
    }

    /** N threads, each calling again as soon as its call returned. */
    String runBlocking(Call call) throws Exception {
      begin();
      Thread[] threads = new Thread[concurrency];
      for (int i = 0; i < concurrency; i++) {
        threads[i] = new Thread(() -> {
          while (true) {
            long sent = System.nanoTime();
            if (sent >= until) {
              return;
            }
            byte[] reply = null;
            Throwable error = null;
            try {
              reply = call.call();
            } catch (Exception e) {
              error = e;
            }
            record(sent, System.nanoTime(), error, reply);
          }
        });
        threads[i].start();
      }
      sampleCpu();
      for (Thread thread : threads) {
        thread.join();
      }
      return json();
    }

    /** N chains of asynchronous calls, each sending its next call from the previous one's completion. */
    String runAsync(Supplier<CompletableFuture<byte[]>> call) throws Exception {
      begin();
      CountDownLatch done = new CountDownLatch(concurrency);
      for (int i = 0; i < concurrency; i++) {
        next(call, done);
      }
      sampleCpu();
      done.await(until - System.nanoTime() + TimeUnit.SECONDS.toNanos(30), TimeUnit.NANOSECONDS);
      return json();
    }

    private void next(Supplier<CompletableFuture<byte[]>> call, CountDownLatch done) {
      long sent = System.nanoTime();
      if (sent >= until) {
        done.countDown();
        return;
      }
      call.get().whenComplete((reply, error) -> {
        record(sent, System.nanoTime(), error, reply);
        next(call, done);
      });
    }

    /** The process's CPU time (every thread) over the measured window. */
    private void sampleCpu() throws InterruptedException {
      OperatingSystemMXBean os = (OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
      TimeUnit.NANOSECONDS.sleep(Math.max(0, from - System.nanoTime()));
      long cpu = os.getProcessCpuTime();
      TimeUnit.NANOSECONDS.sleep(Math.max(0, until - System.nanoTime()));
      synchronized (this) {
        cpuFrom = cpu;
        cpuUntil = os.getProcessCpuTime();
      }
    }

    synchronized String json() {
      long[] sorted = Arrays.copyOf(latenciesNs, count);
      Arrays.sort(sorted);
      double elapsed = Math.max((last - from) / 1e9, 1e-6);
      StringBuilder errs = new StringBuilder();
      errors.forEach((k, v) -> errs.append(errs.length() == 0 ? "" : ", ").append('"').append(k).append("\": ")
          .append(v));
      String cpu = count == 0 || cpuFrom < 0 ? "null"
          : String.format("%.1f", (cpuUntil - cpuFrom) / 1e3 / count);
      return String.format(
          "{\"concurrency\": %d, \"calls\": %d, \"elapsed_s\": %.3f, \"calls_per_sec\": %.1f, "
              + "\"latency_us\": {\"p50\": %s, \"p90\": %s, \"p99\": %s, \"max\": %s}, "
              + "\"client_cpu_us_per_call\": %s, \"errors\": {%s}}",
          concurrency, count, elapsed, count / elapsed, us(sorted, 0.5), us(sorted, 0.9), us(sorted, 0.99),
          us(sorted, 1.0), cpu, errs);
    }

    private static String us(long[] sorted, double q) {
      if (sorted.length == 0) {
        return "0";
      }
      return String.format("%.1f", sorted[Math.min(sorted.length - 1, (int) (q * sorted.length))] / 1e3);
    }
  }
}
