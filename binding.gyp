{
  "targets": [
    {
      "target_name": "vhostd_native",
      "sources": ["src/native/vhostd_native.c", "src/native/rbd.c"],
      "libraries": ["-ldl"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]
    }
  ]
}
