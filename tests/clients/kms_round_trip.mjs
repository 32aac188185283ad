// Drives `keyledger serve` with Node's AWS SDK (@aws-sdk/client-kms), unchanged but for the
// endpoint: node kms_round_trip.mjs ENDPOINT KEY_ID. Credentials come from the standard
// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables. Prints one JSON object of results.
import {
  DecryptCommand,
  DescribeKeyCommand,
  EncryptCommand,
  GenerateDataKeyCommand,
  KMSClient,
} from "@aws-sdk/client-kms";

const [endpoint, keyId] = process.argv.slice(2);
const client = new KMSClient({ endpoint, region: process.env.AWS_REGION || "us-east-1" });
const context = { tenant: "acme", lang: "node" };
const out = {};
try {
  const described = await client.send(new DescribeKeyCommand({ KeyId: keyId }));
  out.keyArn = described.KeyMetadata.Arn;
  out.keyState = described.KeyMetadata.KeyState;
  const enc = await client.send(new EncryptCommand({
    KeyId: keyId, Plaintext: Buffer.from("hello from node"), EncryptionContext: context }));
  const dec = await client.send(new DecryptCommand({
    CiphertextBlob: enc.CiphertextBlob, EncryptionContext: context }));
  out.decrypted = Buffer.from(dec.Plaintext).toString();
  out.decryptKeyId = dec.KeyId;
  try {
    await client.send(new DecryptCommand({
      CiphertextBlob: enc.CiphertextBlob, EncryptionContext: { tenant: "other" } }));
    out.wrongContext = "decrypted";
  } catch (err) {
    out.wrongContext = err.name;
  }
  const dk = await client.send(new GenerateDataKeyCommand({ KeyId: keyId, KeySpec: "AES_256" }));
  out.dataKeyBytes = dk.Plaintext.length;
  const back = await client.send(new DecryptCommand({ CiphertextBlob: dk.CiphertextBlob }));
  out.dataKeyRoundTrip = Buffer.compare(Buffer.from(back.Plaintext), Buffer.from(dk.Plaintext)) === 0;
} catch (err) {
  out.error = `${err.name}: ${err.message}`;
}
console.log(JSON.stringify(out));
