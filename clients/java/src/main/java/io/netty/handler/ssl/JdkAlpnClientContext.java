package io.netty.handler.ssl;

import io.netty.buffer.ByteBufAllocator;
import io.netty.handler.codec.http2.Http2SecurityUtil;
import java.io.File;
import java.util.List;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSessionContext;

/**
 * A client TLS context offering HTTP/2 by ALPN through the JDK's own SSLEngine (Java 9+), for a
 * Netty built without ALPN support.
 *
 * <p>Why it exists: Debian's libnetty-java removes ALPN from {@code JdkSslContext} (it throws "JDK
 * provider does not support ALPN protocol"), and Debian ships neither netty-tcnative nor
 * Conscrypt, so grpc-java's {@code TlsChannelCredentials} cannot build a TLS channel from the
 * Debian jars. gRPC needs ALPN "h2". This context wraps a plain JDK context (certificates and
 * trust as usual, hostname verification set by grpc-java on each engine), asks each engine for
 * "h2" with {@link SSLParameters#setApplicationProtocols}, and reports the protocol the server
 * chose where Netty's {@code SslHandler} looks for it. It lives in Netty's package because that
 * lookup goes through a package-private interface. With Netty from Maven Central (ALPN intact)
 * the example never uses it: {@code TlsChannelCredentials} works there as documented.
 */
public final class JdkAlpnClientContext extends SslContext {
  private static final List<String> H2 = List.of("h2");

  private final SslContext jdk;

  private JdkAlpnClientContext(SslContext jdk) {
    this.jdk = jdk;
  }

  /**
   * A client context trusting {@code ca}, presenting {@code cert}/{@code key} (PEM, PKCS#8 key)
   * when both are non-null.
   */
  public static SslContext forClient(File ca, File cert, File key) throws SSLException {
    SslContextBuilder builder =
        SslContextBuilder.forClient()
            .sslProvider(SslProvider.JDK)
            .trustManager(ca)
            .ciphers(Http2SecurityUtil.CIPHERS, SupportedCipherSuiteFilter.INSTANCE);
    if (cert != null && key != null) {
      builder.keyManager(cert, key);
    }
    return new JdkAlpnClientContext(builder.build());
  }

  @Override
  public boolean isClient() {
    return true;
  }

  @Override
  public List<String> cipherSuites() {
    return jdk.cipherSuites();
  }

  @Override
  public long sessionCacheSize() {
    return jdk.sessionCacheSize();
  }

  @Override
  public long sessionTimeout() {
    return jdk.sessionTimeout();
  }

  @Override
  @SuppressWarnings("deprecation") // the interface grpc-java 1.41 checks for "h2"
  public ApplicationProtocolNegotiator applicationProtocolNegotiator() {
    return () -> H2;
  }

  @Override
  public SSLEngine newEngine(ByteBufAllocator alloc) {
    return new AlpnEngine(jdk.newEngine(alloc));
  }

  @Override
  public SSLEngine newEngine(ByteBufAllocator alloc, String peerHost, int peerPort) {
    return new AlpnEngine(jdk.newEngine(alloc, peerHost, peerPort));
  }

  @Override
  public SSLSessionContext sessionContext() {
    return jdk.sessionContext();
  }

  /** The JDK engine, always offering "h2", answering Netty's question about the outcome. */
  private static final class AlpnEngine extends JdkSslEngine {
    AlpnEngine(SSLEngine engine) {
      super(engine);
      setSSLParameters(engine.getSSLParameters());
    }

    @Override
    public void setSSLParameters(SSLParameters parameters) {
      // grpc-java replaces the parameters to turn on hostname verification: keep "h2" in them.
      parameters.setApplicationProtocols(H2.toArray(new String[0]));
      super.setSSLParameters(parameters);
    }

    @Override
    public String getNegotiatedApplicationProtocol() {
      String protocol = getWrappedEngine().getApplicationProtocol();
      return protocol == null || protocol.isEmpty() ? null : protocol;
    }
  }
}
