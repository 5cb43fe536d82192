package warren.bench;

import java.net.URI;
import java.util.concurrent.CompletableFuture;
import org.springframework.amqp.core.Queue;
import org.springframework.amqp.core.QueueBuilder;
import org.springframework.amqp.rabbit.AsyncRabbitTemplate;
import org.springframework.amqp.rabbit.connection.CachingConnectionFactory;
import org.springframework.amqp.rabbit.core.RabbitAdmin;
import org.springframework.amqp.rabbit.core.RabbitTemplate;
import org.springframework.amqp.rabbit.listener.DirectMessageListenerContainer;
import org.springframework.amqp.rabbit.listener.adapter.MessageListenerAdapter;

/** Spring AMQP without Spring Boot or an application context: the objects a configuration class would declare. */
final class SpringPeer {
  /** The POJO the MessageListenerAdapter calls (its default method name, handleMessage). */
  public static final class Echo {
    public byte[] handleMessage(byte[] body) {
      return body;
    }
  }

  static CachingConnectionFactory connectionFactory(int channels) {
    CachingConnectionFactory factory = new CachingConnectionFactory(URI.create(Bench.brokerUri()));
    factory.setChannelCacheSize(Math.max(25, channels)); // 25 by default: one cached channel per calling thread
    return factory;
  }

  static void server(String queue, String type, int prefetch) throws Exception {
    CachingConnectionFactory factory = connectionFactory(1);
    Queue declared = type.equals("quorum") ? QueueBuilder.durable(queue).quorum().build()
        : QueueBuilder.nonDurable(queue).build();
    new RabbitAdmin(factory).declareQueue(declared);
    DirectMessageListenerContainer container = new DirectMessageListenerContainer(factory);
    container.setQueueNames(queue);
    container.setPrefetchCount(prefetch);
    container.setMessageListener(new MessageListenerAdapter(new Echo()));
    container.afterPropertiesSet();
    container.start();
    System.err.println("consuming " + queue);
    Thread.currentThread().join();
  }

  static RabbitTemplate template(int concurrency) {
    RabbitTemplate template = new RabbitTemplate(connectionFactory(concurrency)); // direct reply-to by default
    template.setReplyTimeout(5000);
    return template;
  }

  static String client(String queue, Bench.Loop loop) throws Exception {
    RabbitTemplate template = template(loop.concurrency);
    return loop.runBlocking(() -> (byte[]) template.convertSendAndReceive("", queue, Bench.PAYLOAD));
  }

  static String asyncClient(String queue, Bench.Loop loop) throws Exception {
    AsyncRabbitTemplate template = new AsyncRabbitTemplate(template(1)); // direct reply-to
    template.start();
    return loop.runAsync(() -> {
      CompletableFuture<Object> reply = template.convertSendAndReceive("", queue, Bench.PAYLOAD);
      return reply.thenApply(body -> (byte[]) body);
    });
  }

  private SpringPeer() {}
}
