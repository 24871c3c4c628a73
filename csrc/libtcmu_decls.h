/*
 * The subset of libtcmu (tcmu-runner 1.5.4, Debian libtcmu2, soname libtcmu.so.2) that
 * tcmu-obd uses, declared from the documented API because Debian ships no headers.
 *
 * Layouts below were checked against the disassembly of libtcmu.so.2 1.5.4-4.1
 * (see docs/tcmu.md "Binding: verified layouts"); tests/frontends/test_tcmu_binding.py
 * pins every offset and exercises the real library on a fake ring.
 *
 * build_tcmu.py feeds this file to cffi's cdef() with preprocessor lines removed, so keep
 * it to plain declarations (no macros, no inline code).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct tcmu_device;      /* opaque (libtcmu_priv.h) */
struct tcmulib_context;  /* opaque */

enum tcmulib_cfg_type {
    TCMULIB_CFG_DEV_CFGSTR = 0,
    TCMULIB_CFG_DEV_SIZE = 1,
    TCMULIB_CFG_WRITE_CACHE = 2,
};

struct tcmulib_cfg_info {
    enum tcmulib_cfg_type type;
    union {
        uint64_t dev_size;
        char *dev_cfgstring;
        bool write_cache;
    } data;
};

/* 88 bytes: added @0x38 (device_add "call *0x38(%rax)"), removed @0x40, check_config @0x20,
 * reconfig @0x28; tcmulib_initialize copies the array (stride 0x58) and sets ctx @0x18. */
struct tcmulib_handler {
    const char *name;
    const char *subtype;
    const char *cfg_desc;
    struct tcmulib_context *ctx;
    bool (*check_config)(const char *cfgstring, char **reason);
    int (*reconfig)(struct tcmu_device *dev, struct tcmulib_cfg_info *cfg);
    bool (*update_logdir)(void);
    int (*added)(struct tcmu_device *dev);
    void (*removed)(struct tcmu_device *dev);
    void *hm_private;
    void *connection;
};

/* 136 bytes (0x88) + hm_cmd_size + iov_cnt * 16 + cdb length, one malloc made by
 * tcmulib_get_next_command and freed by tcmulib_command_complete. */
struct tcmulib_cmd {
    uint16_t cmd_id;
    uint8_t *cdb;
    struct iovec *iovec;
    size_t iov_cnt;
    uint8_t sense_buf[96];
    void *hm_private;
};

/* lifecycle (libtcmu.h) */
struct tcmulib_context *tcmulib_initialize(struct tcmulib_handler *handlers, size_t handler_count);
int tcmulib_get_master_fd(struct tcmulib_context *ctx);
int tcmulib_master_fd_ready(struct tcmulib_context *ctx);
void tcmulib_close(struct tcmulib_context *ctx);
struct tcmulib_cmd *tcmulib_get_next_command(struct tcmu_device *dev, int hm_cmd_size);
void tcmulib_command_complete(struct tcmu_device *dev, struct tcmulib_cmd *cmd, int result);
void tcmulib_processing_start(struct tcmu_device *dev);
void tcmulib_processing_complete(struct tcmu_device *dev);

/* device accessors (libtcmu_common.h) */
void *tcmu_dev_get_private(struct tcmu_device *dev);
void tcmu_dev_set_private(struct tcmu_device *dev, void *priv);
const char *tcmu_dev_get_uio_name(struct tcmu_device *dev);
int tcmu_dev_get_fd(struct tcmu_device *dev);
/* the device's uio mapping (mailbox, ring, data area): *base and *len; returns the malloc'd
 * name of the uio device (the caller frees it) or NULL. The last argument is an off_t * (8
 * bytes on the 64-bit ABIs we build for); libtcmu skips it when NULL, as we pass it. */
char *tcmu_dev_get_memory_info(struct tcmu_device *dev, void **base, size_t *len, int64_t *offset);
char *tcmu_dev_get_cfgstring(struct tcmu_device *dev);
void tcmu_dev_set_num_lbas(struct tcmu_device *dev, uint64_t num_lbas);
uint64_t tcmu_dev_get_num_lbas(struct tcmu_device *dev);
void tcmu_dev_set_block_size(struct tcmu_device *dev, uint32_t block_size);
uint32_t tcmu_dev_get_block_size(struct tcmu_device *dev);
void tcmu_dev_set_unmap_enabled(struct tcmu_device *dev, bool enabled);
bool tcmu_dev_get_unmap_enabled(struct tcmu_device *dev);
void tcmu_dev_set_write_cache_enabled(struct tcmu_device *dev, bool enabled);
bool tcmu_dev_get_write_cache_enabled(struct tcmu_device *dev);
/* 1.5.4 has no tcmu_dev_set_write_protect_enabled (photon-libtcmu only): write protect is
 * emulated in Python (MODE SENSE WP bit, DATA PROTECT on writes). */

/* configfs helpers */
char *tcmu_cfgfs_dev_get_wwn(struct tcmu_device *dev);
int tcmu_cfgfs_mod_param_set_u32(const char *name, uint32_t val);

/* iovec helper */
size_t tcmu_iovec_length(struct iovec *iovec, size_t iov_cnt);
