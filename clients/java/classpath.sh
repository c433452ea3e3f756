# shellcheck shell=bash
# The jars the Java example needs, in one place; sourced by build.sh and run.sh.
#
# The jars come from Debian's /usr/share/java (unversioned symlinks, so a Debian point release
# never breaks the build); set BERTREC_JAVA_LIB_DIR to use another folder holding the same names.
# Each entry is "<jar name without .jar> <Debian package that ships it>".

BERTREC_JAVA_LIB_DIR="${BERTREC_JAVA_LIB_DIR:-/usr/share/java}"

# Needed to run the example (and so also to compile it). grpc-netty is the transport; without
# netty-transport-native-epoll on the classpath it uses plain NIO, which needs no native code.
# netty-codec-socks and netty-handler-proxy are loaded only when a proxy is configured (e.g.
# https.proxyHost); they come with libnetty-java anyway. perfmark-api looks optional but is not:
# without it the transport thread dies silently and every call runs into its deadline.
BERTREC_JAVA_RUNTIME_JARS=(
  "grpc-api libgrpc-java"
  "grpc-context libgrpc-java"
  "grpc-core libgrpc-java"
  "grpc-netty libgrpc-java"
  "grpc-protobuf libgrpc-java"
  "grpc-protobuf-lite libgrpc-java"
  "grpc-stub libgrpc-java"
  "protobuf libprotobuf-java"
  "guava libguava-java"
  "perfmark-api libperfmark-java"
  "gson libgoogle-gson-java"
  "netty-buffer libnetty-java"
  "netty-codec libnetty-java"
  "netty-codec-http libnetty-java"
  "netty-codec-http2 libnetty-java"
  "netty-codec-socks libnetty-java"
  "netty-common libnetty-java"
  "netty-handler libnetty-java"
  "netty-handler-proxy libnetty-java"
  "netty-resolver libnetty-java"
  "netty-transport libnetty-java"
)

# Needed only by javac. The stubs from grpc_java_plugin 1.41 carry @javax.annotation.Generated,
# which left the JDK in Java 11 and has source retention. Guava's classes carry Error Prone
# annotations that javac reads (and warns about, failing -Werror, when they are absent).
BERTREC_JAVA_COMPILE_ONLY_JARS=(
  "geronimo-annotation-1.3-spec libgeronimo-annotation-1.3-spec-java"
  "error-prone-annotations liberror-prone-java"
)

# bertrec_java_classpath compile|runtime
# Prints the classpath (colon-separated) on stdout. If a jar is absent, prints
# "missing toolchain: ..." naming every absent jar and its package on stderr and returns 3.
bertrec_java_classpath() {
  local kind="$1"
  local -a entries=("${BERTREC_JAVA_RUNTIME_JARS[@]}")
  case "$kind" in
    runtime) ;;
    compile) entries+=("${BERTREC_JAVA_COMPILE_ONLY_JARS[@]}") ;;
    *)
      echo "bertrec_java_classpath: unknown kind '$kind' (want compile or runtime)" >&2
      return 2
      ;;
  esac

  local entry jar package path classpath="" missing="" packages=""
  for entry in "${entries[@]}"; do
    jar="${entry%% *}"
    package="${entry#* }"
    path="$BERTREC_JAVA_LIB_DIR/$jar.jar"
    if [[ -f "$path" ]]; then
      classpath="${classpath:+$classpath:}$path"
    else
      missing="${missing:+$missing, }$jar.jar"
      # One mention per package, however many of its jars are absent.
      [[ " $packages " == *" $package "* ]] || packages="${packages:+$packages }$package"
    fi
  done

  if [[ -n "$missing" ]]; then
    echo "missing toolchain: Java libraries $missing in $BERTREC_JAVA_LIB_DIR (install: $packages)" >&2
    return 3
  fi
  printf '%s\n' "$classpath"
}
