package warren.bench;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.RpcClient;
import com.rabbitmq.client.RpcClientParams;
import com.rabbitmq.client.RpcServer;
import java.util.Map;

/** The RabbitMQ Java client's own RPC classes, used as their javadoc shows. */
final class JavaRpcPeer {
  static Connection connect() throws Exception {
    ConnectionFactory factory = new ConnectionFactory();
    factory.setUri(Bench.brokerUri());
    return factory.newConnection("warren-bench");
  }

  static void declare(Channel channel, String queue, String type) throws Exception {
    if (type.equals("quorum")) {
      channel.queueDeclare(queue, true, false, false, Map.of("x-queue-type", "quorum"));
    } else {
      channel.queueDeclare(queue, false, false, false, null);
    }
  }

  static void server(String queue, String type, int prefetch) throws Exception {
    Channel channel = connect().createChannel();
    declare(channel, queue, type);
    channel.basicQos(prefetch);
    RpcServer server = new RpcServer(channel, queue) {
      @Override
      public byte[] handleCall(byte[] requestBody, AMQP.BasicProperties replyProperties) {
        return requestBody; // echo
      }
    };
    System.err.println("consuming " + queue);
    server.mainloop();
  }

  static String client(String queue, Bench.Loop loop) throws Exception {
    Channel channel = connect().createChannel();
    // Direct reply-to is RpcClient's default; one client shared by every calling thread.
    RpcClient client = new RpcClient(new RpcClientParams().channel(channel).exchange("").routingKey(queue)
        .timeout(5000));
    return loop.runBlocking(() -> client.primitiveCall(Bench.PAYLOAD));
  }

  private JavaRpcPeer() {}
}
