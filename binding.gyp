{
  "targets": [
    {
      "target_name": "vhostd_native",
      "sources": ["src/native/vhostd_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]
    }
  ]
}
