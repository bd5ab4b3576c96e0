// Put one daskinfer request (its msgpack bytes, made by any msgpack library) on a Kafka inbox
// partition, and wait until the broker has it.  Needs only kafka-clients on the class path:
//   java -cp 'kafka-clients.jar:slf4j-api.jar' SendRequest.java BOOTSTRAP TOPIC PARTITION KEY FILE
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class SendRequest {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("acks", "all");
        byte[] request = Files.readAllBytes(Path.of(args[4]));
        try (var producer = new KafkaProducer<>(props, new StringSerializer(), new ByteArraySerializer())) {
            var record = new ProducerRecord<>(args[1], Integer.parseInt(args[2]), args[3], request);
            var sent = producer.send(record).get();
            System.out.println("sent to " + sent.topic() + "[" + sent.partition() + "] at offset " + sent.offset());
        }
    }
}
